"""AttributionStrategy: Lightning's DDP without the DistributedDataParallel wrapper, for modules that train nothing.

Attribution computes ∂J/∂w with ``torch.autograd.grad`` and sums w·∂J/∂w into registered buffers on each rank;
ranks reduce those buffers once, when an epoch ends (``strategy.reduce``). Wrapping such a module in
``DistributedDataParallel`` is wrong twice over: DDP broadcasts every buffer from rank 0 before each forward
(overwriting the other ranks' partial sums) and arms a gradient reducer that expects a backward pass that never
comes. This strategy keeps everything else of :class:`DDPStrategy` (process group, launcher, cluster
environments such as SLURM and torchelastic, ``reduce``/``broadcast``/``barrier``) and leaves the module
unwrapped, so the only collectives of a run are the explicit ones.

The ``cad`` CLI uses it in place of ``ddp`` for modules that declare ``synchronizes_gradients = False``;
``Trainer(strategy="ddp_attribution")`` names it directly.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

NAME = "ddp_attribution"


class AttributionStrategy(DDPStrategy):
    """Multi-process, multi-node data parallelism with no per-step synchronisation of parameters or buffers."""

    strategy_name = NAME

    def configure_ddp(self) -> None:
        """Keep the LightningModule as it is: nothing is synchronised per step."""


def uses_gradient_sync(module_class: type) -> bool:
    """False for LightningModules that declare ``synchronizes_gradients = False`` (they reduce explicitly)."""
    return getattr(module_class, "synchronizes_gradients", True)


if NAME not in StrategyRegistry:
    StrategyRegistry.register(NAME, AttributionStrategy, description=AttributionStrategy.__doc__)
