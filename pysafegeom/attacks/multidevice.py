"""GCG on more than one device: a model that accelerate dispatched over devices, and the candidate scoring of
each step split over replicas of the model.

**A dispatched model** (``accelerate.dispatch_model(model, device_map=...)``, ``from_pretrained(...,
device_map=...)``, ``accelerate.cpu_offload``) runs each module on its *execution device*, named by the
module's accelerate hook; a module offloaded to the CPU or the disk keeps its parameters on the ``meta``
device between forwards and loads them from the hook's weights map for each call. GCG reads two weights
itself (the embedding, for the one-hot gradient; the LM head, for the target-only loss), so
:func:`pysafegeom.models.placement.execution_device` and :func:`~pysafegeom.models.placement.module_tensor` find where
a module runs and its weight there. Every
other tensor stays where the model's own layers put it: the prefix KV of each layer on that layer's device,
the last hidden state on the final norm's, the logits on the head's.

**Replicas** (:class:`ReplicatedScorer`, ``GCGConfig.devices``): one copy of the model per device. The
token gradient runs on the model itself; each step's candidates, sorted by the first position at which they
differ from the current suffix, are cut into one contiguous share per device of about equal cost (rows fed),
the shares are scored concurrently (one thread per device; torch releases the GIL inside its kernels) and
the losses gathered in candidate order. The candidates are drawn before the split, from the attack's one
generator, so the search is the same on any number of devices; only how the candidates are batched
changes, which moves a loss by float rounding at most.

Threads suit this because one process holds every replica and the caches pass by reference: on the model's
own device a replica shares the prefix and suffix KV; on another, the prefix KV is copied once per refresh and
the suffix KV (``before + suffix``, a few MB) once per step. Across machines, or for replicas too large for
one process's devices, the same split would run on Ray actors (one actor per GPU holding a replica and the
prompts' caches, a step sending each its share of candidate ids and getting back the losses); that is not
built here.
"""

from __future__ import annotations

import contextlib
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from ..errors import AttackError, InvalidType
from ..models.placement import is_dispatched  # (a dispatched model is not copied whole)


def on_device(device: torch.device):
    """A context making ``device`` the current CUDA device (kernels that launch on the current device, as
    Triton's do, then run where their tensors are; a thread starts on cuda:0); nothing on other devices."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --- the devices of GCGConfig.devices -----------------------------------------------------------------


def parse_devices(devices) -> tuple[str, ...]:
    """``GCGConfig.devices`` checked for form: a non-empty tuple or list of device names torch parses."""
    if isinstance(devices, (str, torch.device)):
        raise InvalidType(f"devices must be a tuple of device names, e.g. ({str(devices)!r},) or ('cuda:0', 'cuda:1'), "
                          f"got the single {type(devices).__name__} {str(devices)!r}")
    if not isinstance(devices, (tuple, list)):
        raise InvalidType(f"devices must be None or a tuple of device names such as ('cuda:0', 'cuda:1'), "
                          f"got {type(devices).__name__}")
    if not devices:
        raise AttackError("devices is empty: name at least one device, or pass devices=None for the model's own")
    out = []
    for i, d in enumerate(devices):
        if not isinstance(d, (str, torch.device)):
            raise InvalidType(f"devices[{i}] must be a device name (a string), got {type(d).__name__} {d!r}")
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError, ValueError):
            raise AttackError(f"devices[{i}]={d!r} is not a device name torch knows; use names such as 'cpu', "
                         "'cuda:0', 'cuda:1'") from None
        if dev.type == "meta":
            raise AttackError(f"devices[{i}] is 'meta', which holds no data: a replica there could not score")
        out.append(str(dev))
    return tuple(out)


def resolve_devices(devices: Sequence[str]) -> list[torch.device]:
    """The devices of ``GCGConfig.devices`` on this machine (``'cuda'`` -> the current CUDA device); a device
    that is not here is refused, saying which are."""
    out = []
    for i, d in enumerate(parse_devices(devices)):
        dev = torch.device(d)
        if dev.type == "cuda":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            idx = dev.index if dev.index is not None else (torch.cuda.current_device() if n else 0)
            if idx >= n:
                have = ", ".join(f"cuda:{k}" for k in range(n)) or "none"
                raise AttackError(f"devices[{i}]={d!r}, but torch sees {n} CUDA device(s) here ({have}); "
                             "name devices that exist, e.g. devices=('cpu', 'cpu') on a machine without a GPU")
            dev = torch.device("cuda", idx)
        out.append(dev)
    return out


def _on_one_device(model) -> torch.device | None:
    """The one device all of ``model``'s parameters and buffers are on and loaded (no accelerate hook), else None."""
    if is_dispatched(model):
        return None
    devs = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devs) != 1:
        return None
    d = devs.pop()
    return None if d.type == "meta" else d


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def replica_models(model, devices: list[torch.device], given=None, *, hash_fn, index: int = 0,
                   n_models: int = 1) -> tuple[list, list[bool]]:
    """One model per device for the attack's model ``model`` (number ``index`` of ``n_models``), and whether
    each was made here (so :meth:`ReplicatedScorer.refresh` may copy new weights into it).

    Without ``given``: the model itself on the first device it is on, a deep copy moved to each other device.
    ``given``: one entry per device, a model there (or, for an ensemble, a list with one per model); each is
    checked to be on its device and to have the model's weights (``hash_fn``, :func:`gcg.model_hash`)."""
    if given is not None:
        if not isinstance(given, (list, tuple)):
            raise InvalidType(f"replicas must be a list with one model per entry of config.devices, got "
                              f"{type(given).__name__}")
        if len(given) != len(devices):
            raise AttackError(f"got {len(given)} replicas for {len(devices)} devices; give one replica per entry "
                         "of config.devices (the model itself may be one of them)")
        want = hash_fn(model)
        out = []
        for i, (r, dev) in enumerate(zip(given, devices)):
            if n_models > 1:
                if not isinstance(r, (list, tuple)) or len(r) != n_models:
                    raise AttackError(f"replicas[{i}] must list one model per ensemble model ({n_models})")
                r = r[index]
            if not isinstance(r, torch.nn.Module):
                raise InvalidType(f"replicas[{i}] must be a model (a torch.nn.Module), got {type(r).__name__}")
            where = _on_one_device(r)
            if where is None or not _same_device(where, dev):
                raise AttackError(f"replicas[{i}] is not wholly loaded on {dev} (config.devices[{i}]): a replica "
                             f"is one model on one device, not dispatched; move it with .to('{dev}')")
            if r is not model and hash_fn(r) != want:
                raise AttackError(f"replicas[{i}] has other weights than the model (model_hash {hash_fn(r)} vs "
                             f"{want}); a replica must be a copy of the model, or the devices would score "
                             "another model")
            out.append(r)
        return out, [False] * len(out)
    home = _on_one_device(model)
    if home is None:
        raise AttackError("config.devices makes a copy of the model on each device, but this model is dispatched "
                     "over several devices (or offloaded) by accelerate and cannot be copied whole; drop "
                     "devices= (the dispatched model scores on its own devices), or pass replicas=, one "
                     "loaded copy per device")
    out, owned, used_self = [], [], False
    for dev in devices:
        if not used_self and _same_device(home, dev):
            out.append(model)
            owned.append(False)
            used_self = True
        else:
            out.append(copy_to(model, dev))
            owned.append(True)
    return out, owned


def copy_to(model, device: torch.device):
    """A deep copy of ``model`` with its parameters and buffers copied straight to ``device`` (never a second
    copy on the model's own device first; tied weights stay tied), frozen."""
    memo: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            v = t.detach().to(device, copy=True)
            memo[id(t)] = torch.nn.Parameter(v, requires_grad=False) if isinstance(t, torch.nn.Parameter) else v
    return copy.deepcopy(model, memo).to(device).requires_grad_(False)


def split_shares(costs: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Cut items with ``costs`` (in order) into ``n`` contiguous ``(start, end)`` shares of about equal total
    cost; shares may be empty when there are fewer items than shares."""
    total = float(sum(costs))
    bounds, start, acc = [], 0, 0.0
    for k in range(1, n):
        goal = total * k / n
        end = start
        while end < len(costs) and acc + costs[end] / 2 <= goal:
            acc += costs[end]
            end += 1
        bounds.append((start, end))
        start = end
    bounds.append((start, len(costs)))
    return bounds


# --- the scorer over replicas -------------------------------------------------------------------------


class ReplicatedScorer:
    """One model's scoring with each step's candidates split over replicas on several devices.

    ``main``: the model's own scorer (the token gradient and the prefix KV are computed there); ``replicas``:
    one scorer per device (``main`` itself may be one); ``owned[i]``: replica i was copied from the model
    here, so :meth:`refresh` copies changed weights into it (a replica given by the user must be kept in
    step by the user; :meth:`refresh` refuses one whose weights no longer match). It has the interface GCG
    uses of a scorer: ``model``, ``t``, ``device``, ``rows_fed``, :meth:`token_grad`, :meth:`score`,
    :meth:`refresh`.
    """

    def __init__(self, main, replicas: list, owned: list[bool], *, hash_fn):
        self.main, self.replicas, self.owned, self._hash = main, list(replicas), list(owned), hash_fn
        self.model, self.t, self.device = main.model, main.t, main.device
        self.devices = [r.device for r in self.replicas]

    @property
    def rows_fed(self) -> int:
        seen = {id(self.main): self.main}
        seen.update({id(r): r for r in self.replicas})
        return sum(s.rows_fed for s in seen.values())

    def token_grad(self, ids: torch.Tensor, active) -> tuple[torch.Tensor, float]:
        g, lo = self.main.token_grad(ids, active)
        for r in self.replicas:
            if r is not self.main:
                r.adopt_step(self.main)
        return g, lo

    def refresh(self) -> None:
        """After the model's weights changed: copy them into the replicas made here, recompute the prefix KV
        on the model and hand it to every replica."""
        want = None
        with torch.no_grad():
            for r, own in zip(self.replicas, self.owned):
                if r.model is self.main.model:
                    continue
                if own:
                    r.model.load_state_dict(self.main.model.state_dict())
                else:
                    want = want or self._hash(self.main.model)
                    if self._hash(r.model) != want:
                        raise AttackError(f"the replica on {r.device} no longer has the model's weights; update "
                                     "the replicas you passed after changing the model (or let GCG copy "
                                     "them: omit replicas=)")
        self.main.refresh()
        for r in self.replicas:
            if r is not self.main:
                r.adopt(self.main)

    def score(self, cands: torch.Tensor, cur: torch.Tensor, b: int) -> torch.Tensor:
        """Losses ``[N]`` (float32, CPU) of ``cands [N, L]`` for behaviour ``b``, in candidate order: each
        replica scores one contiguous share of the candidates sorted by first changed position."""
        cands = cands.cpu()
        p, rows = self.main.first_changed(cands, cur, b)
        order = torch.argsort(p, stable=True)
        costs = rows[order].tolist()
        shares = split_shares(costs, len(self.replicas))
        jobs = [(r, order[s:e]) for r, (s, e) in zip(self.replicas, shares) if e > s]
        out = torch.empty(cands.shape[0], dtype=torch.float32)
        if len(jobs) == 1:
            r, idx = jobs[0]
            out[idx] = _score_on(r, cands[idx], cur, b)
            return out
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="gcg-device") as ex:
            futs = [ex.submit(_score_on, r, cands[idx], cur, b) for r, idx in jobs]
            for (_, idx), f in zip(jobs, futs):
                out[idx] = f.result()
        return out


def _score_on(r, cands: torch.Tensor, cur: torch.Tensor, b: int) -> torch.Tensor:
    with on_device(r.device):
        return r.score(cands, cur, b)


__all__ = ["ReplicatedScorer", "copy_to", "on_device", "parse_devices", "replica_models", "resolve_devices",
           "split_shares"]
