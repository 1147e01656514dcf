"""The optimisers a run can use (`train.optimizer`), their parameter groups, and an SGD whose
Partial FC class proxies can be updated lazily, row by row (the "sparse" update).

`build(name, groups, ...)` makes `sgd` (the SGD below) or `adamw` (torch's AdamW: arcface_torch's
ViT recipe); `param_groups(backbone, head, ...)` splits the parameters by learning rate (a head
multiplier, `train.head_lr_scale`) and weight decay (none for norm weights, biases and PReLU slopes
with `train.no_decay_norm_bias`). The lazy update below is exact for SGD only, so `train.sparse_update`
needs `sgd`.

The sparse update. With Partial FC (`head.sample_rate` < 1) only the sampled rows of a C×d class matrix get a
loss gradient, yet dense SGD still reads and writes all C rows every step for weight decay
and momentum (and autograd first materialises a dense, mostly-zero C×d gradient). At C = 1M
that costs more than the head itself. A parameter registered as `lazy` is instead read with
`read_rows`, which gives it a sparse gradient, and this optimiser updates only the rows that
gradient names.

The rows it skips are not frozen: dense SGD moves a row whose loss gradient is zero by the
linear map (momentum μ, weight decay λ, learning rate η of step t)

    buf_t = μ·buf_{t-1} + λ·w_{t-1},   w_t = w_{t-1} − η·buf_t
    i.e. (w, buf)_t = A_t (w, buf)_{t-1},   A_t = [[1 − ηλ, −ημ], [λ, μ]],

so the optimiser records (η, μ, λ) of every step and, when a row is next read or updated,
applies the product of the A_t it missed in one go (a log-depth suffix scan over the recorded
steps, in float64). The trajectory is therefore the dense one to float32 rounding, whatever
the learning-rate schedule; `catch_up()` brings every row up to date (done before a
checkpoint is written). Unlike insightface's Partial FC v1 or UniFace's code, which freeze
the momentum of unsampled rows, no optimiser state is lost or altered by sampling.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from unitsface.errors import UnitsfaceError
from unitsface.heads.components import ROW_READER, LearnedBias  # ROW_READER: how heads read Partial FC rows
from unitsface.registry import Registry


class _RowReader:
    """`weight.read_rows(columns)`: the rows brought up to date by the optimiser that owns the weight (held
    weakly: an optimiser that is gone reads plain rows)."""

    def __init__(self, optimizer: SGD, weight: torch.Tensor) -> None:
        self.optimizer, self.weight = weakref.ref(optimizer), weakref.ref(weight)

    def __call__(self, columns: torch.Tensor) -> torch.Tensor:
        optimizer, weight = self.optimizer(), self.weight()
        assert weight is not None  # the reader is an attribute of the weight itself
        return weight[columns] if optimizer is None else _LazyRows.apply(weight, columns, optimizer)


class _LazyRows(torch.autograd.Function):
    """Rows `columns` of a lazily updated weight, brought up to date; the gradient of the weight is a
    sparse tensor naming only those rows (what F.embedding(sparse=True) gives, without a second gather)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, columns: torch.Tensor, optimizer: SGD) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(columns)
        ctx.num_rows = weight.shape[0]
        return optimizer.catch_up_rows(weight, columns)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (columns,) = ctx.saved_tensors
        shape = (ctx.num_rows, *grad.shape[1:])
        # Partial FC columns are sorted and distinct: the gradient is already coalesced (no sort needed).
        ordered = bool((columns[1:] > columns[:-1]).all())
        return torch.sparse_coo_tensor(columns.unsqueeze(0), grad, shape, check_invariants=False,
                                       is_coalesced=ordered), None, None


def read_rows(weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`weight[columns]` for a forward pass. For a parameter that an `SGD` updates lazily, the rows
    are first brought up to date and the gradient is sparse (only `columns` are touched)."""
    reader = getattr(weight, ROW_READER, None)
    return weight[columns] if reader is None else reader(columns)


def _transitions(history: torch.Tensor) -> torch.Tensor:
    """The n×2×2 matrices A_t of a zero-gradient SGD step, from rows (η, μ, λ) of `history`."""
    lr, mu, wd = history.unbind(1)
    return torch.stack([torch.stack([1 - lr * wd, -lr * mu], 1), torch.stack([wd, mu], 1)], 1)


def _suffix_products(mats: torch.Tensor) -> torch.Tensor:
    """out[k] = mats[n-1] @ … @ mats[k] for every k, by doubling (log2(n) batched matmuls).

    Invariant: out[k] is the product over [k, k + span); joining it with the block that starts
    at k + span doubles the span. Blocks that already reach the end stay as they are.
    """
    out, span, n = mats.clone(), 1, mats.shape[0]
    while span < n:
        out[: n - span] = torch.matmul(out[span:], out[: n - span])
        span *= 2
    return out


def fused_ok(params: Iterable) -> bool:
    """Whether torch's fused kernels take these parameters: floating point, on the CPU or CUDA. Fused optimisers
    read the GradScaler's inf/NaN flag on the device and skip a bad step there, with no host round trip."""
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)


def keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """A loaded state dict brings its groups' `fused` setting: keep this optimiser's, which is what lets a
    GradScaler skip a bad step on the device (a checkpoint written before it was fused would turn it off)."""
    for group in optimizer.param_groups:
        group["fused"] = optimizer.defaults["fused"]


class SGD(torch.optim.SGD):
    """`torch.optim.SGD` (momentum, weight decay; no dampening or Nesterov) plus lazy row updates.

    Parameters listed in `lazy` (2-D, rows = classes) are updated only on the rows their sparse
    gradient names; the skipped steps are caught up exactly when a row is next used. All other
    parameters, and lazy ones that receive a dense gradient, follow torch's own SGD step, fused where
    torch can (`fused_ok`): a GradScaler then skips a step with inf/NaN gradients on the device.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 lazy: Iterable[torch.nn.Parameter] = ()) -> None:
        params = list(params)
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused_ok(params) or None)
        managed = {id(p) for group in self.param_groups for p in group["params"]}
        self._lazy: list[torch.Tensor] = []
        for p in lazy:
            if id(p) not in managed or p.dim() != 2:
                raise ValueError("lazy parameters must be 2-D parameters handed to this optimizer")
            setattr(p, ROW_READER, _RowReader(self, p))
            self._lazy.append(p)
        self._scratch: dict[tuple[int, str], torch.Tensor] = {}

    def _work(self, p: torch.Tensor, name: str, rows: int) -> torch.Tensor:
        """A reusable rows×d buffer for temporaries: on CPU a fresh tensor of this size costs more in
        page faults than the arithmetic done in it. Not optimiser state (never checkpointed)."""
        buf = self._scratch.get((id(p), name))
        if buf is None or buf.shape[0] < rows:
            buf = self._scratch[(id(p), name)] = torch.empty(rows, *p.shape[1:], dtype=p.dtype, device=p.device)
        return buf[:rows]

    def _group(self, p: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _lazy_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "row_step" not in state:
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
            state["steps"] = torch.zeros((), dtype=torch.long)
            state["history"] = torch.zeros(0, 3, dtype=torch.float64)
            state["history_start"] = torch.zeros((), dtype=torch.long)
        return state

    @torch.no_grad()
    def catch_up_rows(self, p: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Apply to `rows` (distinct) of `p` the zero-gradient steps they missed; returns p[rows], up to date
        (in `out` if given)."""
        w = p.index_select(0, rows) if out is None else torch.index_select(p, 0, rows, out=out)
        state = self.state.get(p)
        if not state or "row_step" not in state:
            return w
        steps = int(state["steps"])
        last = state["row_step"][rows]
        first = int(last.min())
        if first == steps:
            return w
        history = state["history"][first - int(state["history_start"]):]
        # One 2×2 map per row: the product of the steps it missed; up-to-date rows take the identity.
        maps = torch.cat([_suffix_products(_transitions(history)), torch.eye(2, dtype=history.dtype)[None]])
        maps = maps[(last - first).cpu()].to(p.device, p.dtype)
        a, b = maps[:, 0, 0, None], maps[:, 0, 1, None]
        buf = state.get("momentum_buffer")
        if buf is not None:
            n = rows.numel()
            m = torch.index_select(buf, 0, rows, out=self._work(p, "m", n))
            new_m = torch.mul(m, maps[:, 1, 1, None], out=self._work(p, "t", n)).addcmul_(w, maps[:, 1, 0, None])
            buf.index_copy_(0, rows, new_m)
            w.mul_(a).addcmul_(m, b)
        else:  # momentum 0 throughout: w evolves on its own
            w.mul_(a)
        p.index_copy_(0, rows, w)
        state["row_step"][rows] = steps
        return w

    @torch.no_grad()
    def catch_up(self) -> None:
        """Bring every row of every lazy parameter to the dense state of the last step (in chunks of
        rows, to bound the extra memory)."""
        for p in self._lazy:
            for rows in torch.arange(p.shape[0], device=p.device).split(1 << 16):
                self.catch_up_rows(p, rows)
            state = self.state.get(p)
            if state and "row_step" in state:
                state["history"] = state["history"][:0]
                state["history_start"] = state["steps"].clone()

    @torch.no_grad()
    def _lazy_step(self, p: torch.Tensor, group: dict) -> None:
        """One SGD step on the rows named by p.grad (all rows for a dense gradient)."""
        state = self._lazy_state(p)
        grad = p.grad
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        else:
            rows, values = torch.arange(p.shape[0], device=p.device), grad
        n = rows.numel()
        w = self.catch_up_rows(p, rows, out=self._work(p, "w", n))
        lr, mu, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
        d = torch.add(values, w, alpha=wd, out=self._work(p, "t", n)) if wd else values
        if mu:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            d = torch.index_select(buf, 0, rows, out=self._work(p, "m", n)).mul_(mu).add_(d)
            buf.index_copy_(0, rows, d)
        p.index_copy_(0, rows, w.add_(d, alpha=-lr))
        state["steps"] += 1
        state["history"] = torch.cat([state["history"], torch.tensor([[lr, mu, wd]], dtype=torch.float64)])
        state["row_step"][rows] = int(state["steps"])
        # Steps older than the oldest row's are never needed again.
        oldest = int(state["row_step"].min())
        drop = oldest - int(state["history_start"])
        if drop > 0:
            state["history"] = state["history"][drop:]
            state["history_start"] += drop

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = []
        found_inf = self.last_found_inf = getattr(self, "found_inf", None)  # a GradScaler's flag: not finite
        # The lazy rows keep their bookkeeping on the host, so they read the flag there (sparse updates only).
        skip_lazy = bool(self._lazy) and found_inf is not None and bool(found_inf)
        for p in self._lazy:
            if p.grad is not None:
                if not skip_lazy:
                    self._lazy_step(p, self._group(p))
                held.append((p, p.grad))
                p.grad = None  # torch's step below skips parameters without a gradient
        super().step()
        for p, grad in held:
            p.grad = grad
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every floating state tensor to the parameter's dtype; restore the lazy
        bookkeeping's own types (step counters are integers, the history is float64)."""
        super().load_state_dict(state_dict)
        keep_fused(self)
        for p in self._lazy:
            state = self.state.get(p, {})
            for key, dtype in (("row_step", torch.long), ("steps", torch.long), ("history", torch.float64),
                               ("history_start", torch.long)):
                if key in state:
                    state[key] = state[key].to("cpu" if key != "row_step" else p.device, dtype)


class AdamW(torch.optim.AdamW):
    """torch's AdamW (decoupled weight decay), fused where torch can (`fused_ok`). Nothing is updated lazily, so
    `catch_up` has nothing to do; it exists so that the trainer treats every optimiser alike."""

    def __init__(self, params: Iterable, lr: float, weight_decay: float) -> None:
        params = list(params)
        super().__init__(params, lr=lr, weight_decay=weight_decay, fused=fused_ok(params) or None)

    def step(self, closure=None):  # type: ignore[override]
        self.last_found_inf = getattr(self, "found_inf", None)  # a GradScaler's flag, which it deletes after the step
        return super().step(closure)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        keep_fused(self)

    def catch_up(self) -> None:
        pass


OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict[str, Any]], lr: float, momentum: float, weight_decay: float,
         lazy: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, lazy=lazy)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict[str, Any]], lr: float, momentum: float, weight_decay: float,
           lazy: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """betas (0.9, 0.999), eps 1e-8 (torch's defaults, as arcface_torch); `momentum` is not used."""
    if list(lazy):
        raise UnitsfaceError("train.sparse_update needs train.optimizer=sgd: the lazy row update reproduces "
                             "SGD's momentum and weight decay, not AdamW's moments")
    return AdamW(groups, lr=lr, weight_decay=weight_decay)


def names() -> list[str]:
    """The optimiser names `train.optimizer` accepts."""
    return OPTIMIZERS.names()


def build(name: str, groups: list[dict[str, Any]], lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
          lazy: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """Optimiser `name` over `groups` (from `param_groups`); `lr` and `weight_decay` are the defaults of
    groups that set none. Unknown names raise UnitsfaceError listing the known ones."""
    return OPTIMIZERS.get(name)(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, lazy=lazy)


_NO_DECAY_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


def _exempt_from_decay(module: nn.Module, name: str) -> bool:
    """Norm weights and biases, PReLU slopes, any parameter called `bias`, and a head's learned threshold bias."""
    return isinstance(module, (*_NO_DECAY_MODULES, LearnedBias)) or name == "bias"


def param_groups(backbone: nn.Module, head: nn.Module, lr: float, weight_decay: float, head_lr_scale: float = 1.0,
                 no_decay_norm_bias: bool = False, bias_weight_decay: float | None = None) -> list[dict[str, Any]]:
    """The trainable parameters of `backbone` then `head`, grouped by (lr, weight decay).

    Head parameters train at `lr · head_lr_scale`. With `no_decay_norm_bias`, norm weights, biases and
    PReLU slopes get no weight decay: decay pulls a BatchNorm gamma or a PReLU slope towards 0, which
    changes what the layer computes rather than regularising it. `bias_weight_decay`, when set, is the
    decay of a head's learned threshold bias whatever the rest: the references decay b with the global
    5e-4, which pulls the threshold b/s towards 0 (methods.md §3.4). Groups with the same settings are
    merged, in first-seen order, so the defaults give one group in module order (the layout of
    checkpoints written before groups existed).
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()  # a parameter shared by two modules is optimised once
    for part, scale in ((backbone, 1.0), (head, head_lr_scale)):
        for module in part.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    if bias_weight_decay is not None and isinstance(module, LearnedBias):
                        decay = bias_weight_decay
                    else:
                        decay = 0.0 if no_decay_norm_bias and _exempt_from_decay(module, name) else weight_decay
                    groups.setdefault((lr * scale, decay), []).append(p)
    return [{"params": params, "lr": group_lr, "weight_decay": decay} for (group_lr, decay), params in groups.items()]
