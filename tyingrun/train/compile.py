"""hardware.compile=true: regional compilation, one graph per block kind that every slot and every tying map reuses.

Compiling the whole loss (as ``torch.compile(model.loss)``) guards on the map, so every new map recompiles and after
torch's recompile limit the run falls back to eager. Here, as torchtitan compiles Llama blocks, each block's
``forward`` is compiled on its own: every instance of a block class runs one compiled function (its parameters are
graph inputs, so slots, ties and aliases reuse the graph); the module's hooks (FSDP2's gathers) stay outside it.
The rest of the loss (embeddings, final norm, head, cross-entropy) is compiled around the stack, whose own
``forward`` dynamo does not trace: the map is not visible to any graph.

A block runs compiled only while it trains with gradients enabled; evaluation (eval mode, no_grad) runs eager, so it
adds no graphs. What still makes a block kind compile again is a change of what its graph computes: a slot whose
weights need no gradient (a frozen layer, a ``frozen_copy`` tie) is a second graph, so ``<= 2`` per kind.

``RegionalCompile.graphs`` counts the graphs compiled per region ("block:PreLNBlock", "loss": the loss is several
graphs, split where the stack runs); ``recompiles`` counts those that dynamo compiled again for a function it had
compiled before (a guard failed), what ``summary.json`` records as ``compile_recompiles``.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Callable, Dict, List, Type

import torch
from torch import nn

from tyingrun.contracts import TiedModule

# Graphs compiled per region since the process started, and those of them that recompiled a function: the backend
# below is one object for every run (dynamo recompiles when the backend object changes), so the counts of one run
# are the difference over it.
_GRAPHS: Counter = Counter()
_RECOMPILES: Counter = Counter()


@functools.cache
def _counting_backend(region: str) -> Callable:
    """Inductor, counting each graph it is handed under ``region``; cached so each region keeps one backend object."""
    inductor = torch._dynamo.lookup_backend("inductor")

    def backend(graph: torch.fx.GraphModule, example_inputs: List[Any]):
        _GRAPHS[region] += 1
        compile_id = torch._guards.CompileContext.current_compile_id()
        if compile_id is not None and compile_id.frame_compile_id:
            _RECOMPILES[region] += 1
        return inductor(graph, example_inputs)

    return backend


# Per block class, its compiled ``forward``, shared by every instance (one code object, one cache).
_COMPILED_FORWARD: Dict[Type[nn.Module], Callable] = {}


def _compiled_forward(kind: Type[nn.Module]) -> Callable:
    # The class that defines forward: FSDP2 makes each sharded block an instance of a subclass (FSDPPreLNBlock).
    kind = next(base for base in kind.__mro__ if "forward" in vars(base))
    if kind not in _COMPILED_FORWARD:
        _COMPILED_FORWARD[kind] = torch.compile(kind.forward, backend=_counting_backend(f"block:{kind.__name__}"),
                                                fullgraph=True, dynamic=False)
    return _COMPILED_FORWARD[kind]


def _block_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    if block.training and torch.is_grad_enabled():
        return _compiled_forward(type(block))(block, *args, **kwargs)
    return type(block).forward(block, *args, **kwargs)


class RegionalCompile:
    """Compile ``model``'s blocks (each class once) and the loss around its stack; count what compiles."""

    def __init__(self, model: TiedModule):
        self._graphs_before, self._recompiles_before = Counter(_GRAPHS), Counter(_RECOMPILES)
        for block in model.stack.blocks:
            block.forward = functools.partial(_block_forward, block)
        model.stack.forward = torch.compiler.disable(model.stack.forward)  # type: ignore[method-assign]
        self.loss = torch.compile(model.loss, backend=_counting_backend("loss"), dynamic=False)

    @property
    def graphs(self) -> Dict[str, int]:
        """Graphs compiled per region since this model was set up."""
        return _since(_GRAPHS, self._graphs_before)

    @property
    def recompiles(self) -> Dict[str, int]:
        """Per region that compiled since this model was set up, the graphs that recompiled a function."""
        recompiled = _since(_RECOMPILES, self._recompiles_before)
        return {region: recompiled.get(region, 0) for region in self.graphs}


def _since(counts: Counter, before: Counter) -> Dict[str, int]:
    return {region: count - before[region] for region, count in sorted(counts.items()) if count > before[region]}
