"""PyTorch models trained through a session: :class:`RemoteOptimizer`, a ``torch.optim.Optimizer``.

::

    import torch
    from paramserver import optimizers
    from paramserver.client import Client
    from paramserver.client.torch import RemoteOptimizer, create_session

    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with Client("http://127.0.0.1:8000") as client:
        session = create_session(client, model, optimizers.Adam(lr=1e-3))
        optimizer = RemoteOptimizer(model, session)
        for x, y in batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()  # pushes the gradients; the new weights land in the parameters

The server applies the session's Keras 2.2 optimizer (:mod:`paramserver.optimizers`); the
torch optimizer only moves tensors. What maps to what (``docs/frameworks.md``):

* **Parameters** are the model's ``named_parameters()`` that require a gradient, keyed by
  those names (``"0.weight"``, ``"encoder.fc.bias"``): names do not depend on the process, so
  workers that build the same model join the same session. Parameters with
  ``requires_grad=False`` are not part of the session and never change; buffers (BatchNorm's
  running statistics) stay on each worker.
* **dtypes**: a parameter's session keeps its dtype (float32 for torch's defaults; float16 and
  float64 too); bfloat16 and other dtypes are refused, naming the parameter.
* :meth:`RemoteOptimizer.step` sends every gradient from its own memory and receives the new
  weights straight into the parameters' memory (``out=`` of :meth:`Session.push`, numpy views
  of the tensors): no copy beyond the wire on CPU. A parameter on another device (CUDA, MPS)
  goes through a CPU buffer kept per parameter: one copy to the host and one back per step.
* A parameter whose ``.grad`` is ``None`` is refused before anything is sent: zeros are not
  neutral for momentum or Adam, which would still move that weight.
* :meth:`RemoteOptimizer.state_dict` is the session's whole state (weights, slots, iterations,
  optimizer configuration) as :meth:`SessionState.to_bytes` bytes; ``torch.save`` and
  ``torch.load(weights_only=True)`` carry it.

This module needs PyTorch (``pip install 'paramserver[torch]'``); ``paramserver.client``
itself never imports it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias, overload

import numpy as np

try:
    import torch
except ImportError as exc:  # the extra is optional: say how to get it
    raise ImportError(
        "paramserver.client.torch needs PyTorch: pip install 'paramserver[torch]' (the CPU "
        "build torch==2.13.0+cpu; a plain 'pip install torch' also pulls CUDA's packages)",
        name=exc.name,
    ) from exc

from paramserver.messages import SessionState
from paramserver.sparse import Rows

from ._base import DictWeights, OptimizerLike, Parameter
from .sync import Client, Session

__all__ = [
    "ModelParameters",
    "RemoteOptimizer",
    "create_session",
    "join_session",
    "trainable_parameters",
]

#: What names the parameters: a model (its ``named_parameters()``) or ``(name, tensor)`` pairs.
ModelParameters: TypeAlias = "torch.nn.Module | Iterable[tuple[str, torch.Tensor]]"

#: The dtypes a session's parameters may have (the wire's float dtypes).
_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}
#: The most names one error message lists for each kind of mismatch.
_LISTED = 10


class RemoteOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is a push to a parameter server session.

    ``params`` is the model itself or ``model.named_parameters()`` (names are how the session
    knows its parameters; plain tensors and parameter groups are refused); those with
    ``requires_grad=False`` are left out, as :func:`create_session` leaves them out.
    ``session`` is a blocking :class:`~paramserver.client.Session` whose parameters have the
    same names, shapes and dtypes (checked here, one ``GET``: the error names each mismatch).

    * :meth:`step` pushes ``param.grad`` of every parameter and writes the answer's weights
      into the parameters in place (the same tensors, the same memory); ``step(closure)``
      first runs ``closure`` (which zeroes the gradients, runs backward and returns the loss)
      and returns its loss, as torch's optimizers do.
    * :meth:`zero_grad` is torch's (``set_to_none=True``).
    * :meth:`pull` writes the session's current weights into the parameters (after
      ``StaleGradient`` in a sync session, or to catch up with other workers).
    * :meth:`state_dict` / :meth:`load_state_dict`: the session's state (:meth:`state_dict`).

    The learning rate and its schedule are the session's optimizer's (``decay=``): the
    parameter group has no ``lr``, so a ``torch.optim.lr_scheduler`` cannot drive it. Errors of
    the push propagate (:mod:`paramserver.client.errors`): a push refused (before sending, or
    by the server) leaves the parameters as they were; one that fails while its answer is
    arriving (``TransportError``) may have written part of the weights: :meth:`pull` first.
    """

    def __init__(self, params: ModelParameters, session: Session[Any]) -> None:
        if not isinstance(session, Session):
            raise TypeError(
                "session must be a blocking paramserver.client.Session (from Client, or "
                "create_session / join_session of this module); got "
                f"{type(session).__name__}"
            )
        named = trainable_parameters(params)
        _check_fits(named, session.info().parameters, f"session {session.id!r}")
        self.session = session
        self._named = named
        self._host = _HostMemory(named)
        self._ready = False
        super().__init__([{"params": named}], {})
        self._ready = True

    @property
    def names(self) -> tuple[str, ...]:
        """The parameters' names, in the model's order."""
        return tuple(name for name, _ in self._named)

    @property
    def iterations(self) -> int | None:
        """The iteration count of the weights now in the parameters (``None`` before this
        handle received any: :meth:`pull`)."""
        return self.session.base_iterations

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Torch's, for the one group made in ``__init__``; afterwards refused: a session's
        parameters are fixed when it is created."""
        if getattr(self, "_ready", False):
            raise ValueError(
                "a RemoteOptimizer cannot take more parameters: the session's parameters are "
                "fixed when it is created (create a session from the whole model)"
            )
        super().add_param_group(param_group)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Push the gradients (one step of the session's optimizer); the new weights are
        written into the parameters. Returns ``closure()``'s loss, if a closure is given.

        Refused before anything is sent (``ValueError``, naming them) if a parameter has no
        gradient (``.grad is None``: it took no part in the loss, or ``zero_grad()`` ran
        after ``backward()``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            gradients = self._gradients()
            self.session.push(gradients, out=self._host.arrays())
            self._host.written()
        return loss

    def pull(self, *, min_iterations: int | None = None, wait: float | None = None) -> None:
        """Write the session's current weights into the parameters (in place). With
        ``min_iterations`` (and ``wait`` seconds) the server answers once the session reaches
        that iteration, or after ``wait`` with what it has (:meth:`Session.pull`): compare
        :attr:`iterations`."""
        with torch.no_grad():
            self.session.pull(out=self._host.arrays(), min_iterations=min_iterations, wait=wait)
            self._host.written()

    def state_dict(self) -> dict[str, Any]:
        """The session's whole state, in torch's layout::

            {"state": {},                  # per-parameter state: on the server, see below
             "param_groups": [{"params": [0, 1, ...], "param_names": [...]}],
             "session_state": bytes}       # SessionState.to_bytes(): weights, slots, ...

        ``session_state`` holds the weights, the optimizer's slots and scalars, the iteration
        count and the session's settings (one ``GET .../state``); the same bytes as a
        checkpoint file of :meth:`SessionState.to_bytes`. ``torch.save`` /
        ``torch.load(weights_only=True)`` carry it.
        """
        state = self.session.state()
        return {
            "state": {},
            "param_groups": [
                {"params": list(range(len(self._named))), "param_names": list(self.names)}
            ],
            "session_state": state.to_bytes(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace the session's state with ``state_dict``'s (:meth:`state_dict`), and write its
        weights into the parameters: training continues exactly where the state was taken.

        Refused before anything is sent if it is not such a state (a ``torch.optim``
        optimizer's has no ``session_state``) or if its parameters do not fit the model's
        (names, shapes and dtypes, each mismatch named).
        """
        if not isinstance(state_dict, Mapping) or "session_state" not in state_dict:
            keys = sorted(state_dict) if isinstance(state_dict, Mapping) else None
            raise ValueError(
                "not a RemoteOptimizer state_dict: it has no 'session_state' (got "
                f"{type(state_dict).__name__}{'' if keys is None else f' with keys {keys}'}); "
                "a torch.optim optimizer's state does not describe a session"
            )
        data = state_dict["session_state"]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"state_dict['session_state'] must be bytes, got {type(data).__name__}")
        state = SessionState.from_bytes(data)
        described = {
            name: Parameter(str(array.dtype), tuple(array.shape))
            for name, array in state.weights.items()
        }
        _check_fits(self._named, described, "the state_dict")
        self.session.load_state(state)
        with torch.no_grad():
            arrays = self._host.arrays()
            for name, array in arrays.items():
                np.copyto(array, state.weights[name])
            self._host.written()

    def _gradients(self) -> dict[str, Any]:
        """Every parameter's gradient as a numpy array (a view of ``.grad`` on CPU)."""
        missing = [name for name, param in self._named if param.grad is None]
        if missing:
            raise ValueError(
                f"parameter{'s' if len(missing) > 1 else ''} {_listed(missing)} got no "
                "gradient (.grad is None: not used in the loss, or zero_grad() ran after "
                "backward()); nothing was pushed. Zeros are not neutral for most optimizers "
                "(momentum and Adam still move such a weight): use the parameter in the "
                "loss, or freeze it (requires_grad_(False)) before creating the session"
            )
        gradients: dict[str, Any] = {}
        for name, param in self._named:
            grad = param.grad
            assert grad is not None
            if grad.layout == torch.sparse_coo and grad.sparse_dim() == 1:
                # Embedding(sparse=True): only the rows the batch touched travel (the server
                # sums repeated indices, as to_dense() would)
                gradients[name] = Rows(
                    grad._indices()[0].detach().cpu().numpy(),
                    grad._values().detach().cpu().numpy(),
                )
                continue
            if grad.layout != torch.strided:  # other sparse layouts: dense
                grad = grad.to_dense()
            gradients[name] = grad.detach().cpu().numpy()
        return gradients


class _HostMemory:
    """The parameters' CPU memory as numpy arrays, what the session writes weights into.

    A CPU parameter's array is a view of its own memory, taken afresh each time (cheap, and
    right after ``module.to(...)`` replaced a parameter's storage). A parameter on another
    device gets a CPU tensor of its shape, kept for the next step, copied back after each write.
    """

    def __init__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self._named = named
        self._staging: dict[str, torch.Tensor] = {}

    def arrays(self) -> DictWeights:
        out: DictWeights = {}
        for name, param in self._named:
            if param.device.type == "cpu":
                self._staging.pop(name, None)
                out[name] = param.detach().numpy()
                continue
            staging = self._staging.get(name)
            if staging is None or staging.shape != param.shape or staging.dtype != param.dtype:
                staging = self._staging[name] = torch.empty(
                    param.shape, dtype=param.dtype, device="cpu"
                )
            out[name] = staging.numpy()
        return out

    def written(self) -> None:
        """After the arrays were written: copy staged weights to their devices, and tell
        autograd the parameters changed in place (as torch's own optimizers' in-place updates
        do), so a graph that saved the old values refuses to run backward through them."""
        for name, param in self._named:
            staging = self._staging.get(name)
            if staging is not None:
                param.copy_(staging)  # counts as an in-place change of its own
        torch.autograd.graph.increment_version(
            [param for name, param in self._named if name not in self._staging]
        )


def trainable_parameters(params: ModelParameters) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of the parameters a session holds: the model's (or the pairs')
    that require a gradient, in order; plain tensors and parameter groups are refused
    (``TypeError``), as are duplicate names, an empty list (``ValueError``) and dtypes a
    session cannot hold (``TypeError``, naming the parameter)."""
    if isinstance(params, torch.nn.Module):
        params = params.named_parameters()
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be a model or model.named_parameters(), got a single Tensor")
    named: list[tuple[str, torch.Tensor]] = []
    for item in params:
        if isinstance(item, dict):
            raise TypeError(
                "parameter groups do not apply: the session's one Keras optimizer updates every "
                "parameter; pass the model or model.named_parameters()"
            )
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            raise TypeError(
                "a session keys parameters by name: pass the model or model.named_parameters() "
                f"((name, tensor) pairs), not {type(item).__name__}s"
            )
        named.append(item)
    duplicates = [name for name, n in Counter(name for name, _ in named).items() if n > 1]
    if duplicates:
        raise ValueError(f"parameter names must be unique; repeated: {_listed(duplicates)}")
    if len({id(param) for _, param in named}) != len(named):
        raise ValueError(
            "a tensor appears under two names: pass each parameter once (as "
            "model.named_parameters() does for shared weights)"
        )
    trainable = [(name, param) for name, param in named if param.requires_grad]
    if not trainable:
        raise ValueError(
            "no parameter requires a gradient: a session holds the trainable parameters "
            "(those with requires_grad=False are left out)"
        )
    for name, param in trainable:
        if param.dtype not in _DTYPES:
            raise TypeError(
                f"parameter {name!r} is {param.dtype}; a session holds float16, float32 or "
                "float64 parameters (for bfloat16 compute keep float32 parameters and use "
                "torch.autocast)"
            )
        if not param.is_leaf:
            raise ValueError(f"parameter {name!r} is not a leaf tensor: it cannot be trained")
    return trainable


def _check_fits(
    named: list[tuple[str, torch.Tensor]], parameters: Mapping[str, Parameter], where: str
) -> None:
    """Raise ``ValueError`` naming every difference between the model's trainable parameters
    and ``parameters`` (a session's, a state's): names on one side only, shapes, dtypes."""
    ours = {name: Parameter(_DTYPES[p.dtype], tuple(p.shape)) for name, p in named}
    only_model = [name for name in ours if name not in parameters]
    only_theirs = [name for name in parameters if name not in ours]
    shapes, dtypes = [], []
    for name, mine in ours.items():
        theirs = parameters.get(name)
        if theirs is None:
            continue
        if tuple(theirs.shape) != mine.shape:
            shapes.append(f"{name!r} {list(mine.shape)} vs {list(theirs.shape)}")
        elif theirs.dtype != mine.dtype:
            dtypes.append(f"{name!r} {mine.dtype} vs {theirs.dtype}")
    problems = []
    if only_model:
        problems.append(f"missing from it: {_listed(only_model)}")
    if only_theirs:
        problems.append(f"not trainable parameters of the model: {_listed(only_theirs)}")
    if shapes:
        problems.append(f"shapes differ (model vs it): {', '.join(shapes[:_LISTED])}")
    if dtypes:
        problems.append(f"dtypes differ (model vs it): {', '.join(dtypes[:_LISTED])}")
    if not problems:
        return
    hint = _prefix_hint(list(ours), list(parameters)) if only_model and only_theirs else ""
    raise ValueError(
        f"{where} does not fit the model's trainable parameters: {'; '.join(problems)}{hint}"
    )


def create_session(
    client: Client,
    model: ModelParameters,
    optimizer: OptimizerLike,
    session_id: str | None = None,
    **options: Any,
) -> Session[DictWeights]:
    """A new session holding ``model``'s trainable parameters by name (their current values,
    in their dtypes), updated by ``optimizer``: a Keras 2.2 optimizer of
    :mod:`paramserver.optimizers` or its name (a ``torch.optim`` optimizer is refused).
    ``options`` go to :meth:`Client.create_session` (``training=``, ``refuse_non_finite=``,
    ``constraints=``, ``replicas_to_aggregate=``, ...)."""
    _refuse_torch_optimizer(optimizer)
    named = trainable_parameters(model)
    weights = {name: param.detach().cpu().numpy() for name, param in named}
    return client.create_session(weights, optimizer, session_id, **options)


def join_session(client: Client, model: ModelParameters, session_id: str) -> Session[DictWeights]:
    """Attach to session ``session_id``, check that it holds exactly ``model``'s trainable
    parameters (names, shapes, dtypes; ``ValueError`` naming each mismatch, the model
    untouched) and write its current weights into them: a worker process's start."""
    named = trainable_parameters(model)
    session = client.session(session_id)
    _check_fits(named, session.info().parameters, f"session {session_id!r}")
    host = _HostMemory(named)
    with torch.no_grad():
        session.pull(out=host.arrays())
        host.written()
    return session


def _refuse_torch_optimizer(optimizer: Any) -> None:
    is_class = isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)
    if isinstance(optimizer, torch.optim.Optimizer) or is_class:
        name = optimizer.__name__ if is_class else type(optimizer).__name__
        raise TypeError(
            f"optimizer is a PyTorch optimizer ({name}); the server applies a Keras 2.2 "
            "optimizer: pass one of paramserver.optimizers (optimizers.Adam(lr=1e-3), "
            "optimizers.SGD(lr=0.01, momentum=0.9), ...) or its name ('adam'), then train "
            "with RemoteOptimizer(model, session) as the torch optimizer"
        )


def _prefix_hint(model_names: list[str], session_names: list[str]) -> str:
    """A hint when the two sides differ by a first name component on every parameter, as a
    wrapper adds one (``module.`` of DistributedDataParallel, ``_orig_mod.`` of
    torch.compile)."""

    def strip(names: list[str]) -> set[str]:
        return {name.split(".", 1)[1] for name in names if "." in name}

    for longer, shorter, side in (
        (model_names, session_names, "model's"),
        (session_names, model_names, "session's"),
    ):
        if len(longer) == len(shorter) and strip(longer) == set(shorter):
            prefix = longer[0].split(".", 1)[0]
            return (
                f" (the {side} names carry an extra '{prefix}.': a wrapper such as "
                "DistributedDataParallel or torch.compile adds one; use the inner model)"
            )
    return ""


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_LISTED])
    more = len(names) - _LISTED
    return f"[{shown}{f', and {more} more' if more > 0 else ''}]"
