"""Block-local losses (Ren et al. 2023): a block list (``blocks.py`` draws the blocks,
``sequence.py`` trains them) or an unchanged Flax model whose blocks end where
``boundaries`` say (``model.py``); heads, column splits and taps in their own modules."""

from fgrad_jax._local.common import LocalAux, LocalVariables
from fgrad_jax._local.entry import local_losses
from fgrad_jax._local.model import ModelLocalLosses
from fgrad_jax._local.sequence import LocalLosses

__all__ = ["LocalAux", "LocalLosses", "LocalVariables", "ModelLocalLosses", "local_losses"]
