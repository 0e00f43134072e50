"""Fine-tuning benchmark: forward gradients against MeZO (SPSA) and backprop.

Pretrains a small CNN and a small ViT on Fashion-MNIST with backprop (checkpointed once
with orbax and reused), then fine-tunes them on scikit-learn's digits resized to 28x28,
few-shot (16 examples per class) and with all training examples, with every method of
:mod:`experiments.finetune.configs`. Run ``python -m experiments.finetune.main --preset
quick --out DIR``; see docs/finetuning.md.
"""
