"""AdamW whose state lives in host memory, one decoder block at a time on the device (GRASS, "Layer-wise
optimizer-state offloading").

State is kept per block group as one flat fp32 buffer ``[exp_avg | exp_avg_sq]`` in (pinned) host memory, plus a
0-dim fp32 step count per parameter that never leaves the host, as in ``torch.optim.AdamW``. At ``step()`` the
groups that have a gradient are streamed through the device: the compute stream waits for group i's H2D copy,
updates it with torch's own functional AdamW, and a side stream copies it back while the next group's H2D copy,
issued before the update, runs on a second side stream. Between steps no optimizer state is on the device.
Everything is keyed by parameter name, so a checkpoint survives changes of the trainable set (ANCHORS.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _functional_adam

_BLOCK_INDEX = re.compile(r"^\d+$")


def block_key(name: str) -> str:
    """The default group key: the name up to its first integer component, else the name itself.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``model.layers.3``; ``model.norm.weight`` -> itself.
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if _BLOCK_INDEX.match(part):
            return ".".join(parts[: i + 1])
    return name


class LayerwiseOffloadAdamW(torch.optim.Optimizer):
    """AdamW (same numerics as ``torch.optim.AdamW``) with per-block state offloaded to host memory.

    There is one param group per block group, carrying ``"name"`` (the key) and ``"param_names"``, so LR
    schedulers work as usual. ``self.state`` stays empty: state is held by name in a host store.

    Args:
        named_parameters: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``; give every candidate
            parameter, frozen or not. A tensor listed under two names (tied weights) is kept once, first name.
        lr: Learning rate.
        betas: Coefficients of the running averages of the gradient and its square.
        eps: Term added to the denominator for numerical stability.
        weight_decay: Decoupled weight decay coefficient.
        group_fn: Maps a parameter name to its group key; defaults to :func:`block_key`.
        offload: If False, state stays on the parameters' device (no copies); the API is unchanged.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, Tensor]], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 group_fn: Callable[[str], str] | None = None, offload: bool = True):
        errors = []
        if not 0.0 <= lr:
            errors.append(f"`lr` must be >= 0, got {lr}")
        if not 0.0 <= eps:
            errors.append(f"`eps` must be >= 0, got {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                errors.append(f"`betas[{i}]` must be in [0, 1), got {beta}")
        if not 0.0 <= weight_decay:
            errors.append(f"`weight_decay` must be >= 0, got {weight_decay}")
        if errors:
            raise ValueError("; ".join(errors))
        group_fn = group_fn or block_key
        groups: dict[str, dict[str, Any]] = {}
        seen: dict[int, str] = {}
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], Tensor)):
                raise TypeError(f"`named_parameters` must yield (str, Tensor) pairs, got {type(item).__name__}")
            name, p = item
            if id(p) in seen:  # tied weights: the same tensor is optimised once, under its first name
                continue
            seen[id(p)] = name
            key = group_fn(name)
            if not isinstance(key, str):
                raise TypeError(f"`group_fn` must return a str, got {type(key).__name__} for {name!r}")
            group = groups.setdefault(key, {"params": [], "param_names": [], "name": key})
            group["params"].append(p)
            group["param_names"].append(name)
        if not groups:
            raise ValueError("`named_parameters` is empty: the optimizer needs at least one parameter")
        self._offload = offload
        self._pin = offload and torch.cuda.is_available()  # pinned host memory makes the copies truly async
        self._numel: dict[str, int] = {}  # group key -> total elements of the group's parameters
        self._slot: dict[str, tuple[str, int, int]] = {}  # param name -> (group key, offset, numel)
        self._by_name: dict[str, Tensor] = {}
        self._store: dict[str, Tensor] = {}  # group key -> flat fp32 [exp_avg | exp_avg_sq]; host iff offload
        self._steps: dict[str, Tensor] = {}  # param name -> 0-dim fp32 step count on the host
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self._live_bytes = 0
        self._peak_bytes = 0
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(list(groups.values()), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group; it must carry a new ``"name"`` and one ``"param_names"`` entry per parameter."""
        names = list(param_group.get("param_names", []))
        if "name" not in param_group or len(names) != len(list(param_group.get("params", []))):
            raise ValueError("a param group needs a 'name' and one 'param_names' entry per parameter")
        if param_group["name"] in self._numel or any(n in self._slot for n in names):
            raise ValueError(f"param group {param_group['name']!r} repeats an existing group or parameter name")
        super().add_param_group(param_group)
        offset = 0
        for name, p in zip(names, param_group["params"]):
            if p.is_complex():
                raise ValueError(f"complex parameter {name!r} is not supported")
            self._slot[name] = (param_group["name"], offset, p.numel())
            self._by_name[name] = p
            offset += p.numel()
        self._numel[param_group["name"]] = offset

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Updates every parameter that has a gradient; parameters without one keep their state untouched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            items = [(n, p) for n, p in zip(group["param_names"], group["params"]) if p.grad is not None]
            sparse = [n for n, p in items if p.grad.is_sparse]
            if sparse:
                raise RuntimeError(f"LayerwiseOffloadAdamW does not support sparse gradients: {sparse}")
            if items:
                devices = {p.device for _, p in items}
                if len(devices) > 1:
                    raise RuntimeError(f"group {group['name']!r} has parameters on several devices: {devices}")
                work.append((group, items, devices.pop()))
        if not self._offload:  # the store is the working buffer: update in place, no copies
            for group, items, device in work:
                store = self._store.get(group["name"])
                if store is None:
                    store = self._store[group["name"]] = torch.zeros(2 * self._numel[group["name"]], device=device)
                elif store.device != device:  # the model was moved since the last step
                    store = self._store[group["name"]] = store.to(device)
                self._update(group, items, store)
            return loss
        self._peak_bytes = self._live_bytes = 0  # nothing is on the device between steps
        fetched = self._fetch(work[0][0]["name"], work[0][2]) if work else None
        previous = None
        for i, (group, items, device) in enumerate(work):
            buf, ready = fetched
            if ready is not None:
                # the update reads the state that the H2D copy on the side stream is writing
                torch.cuda.current_stream(device).wait_event(ready)
            # issue the next group's H2D copy before this update so that the two overlap on the GPU
            fetched = self._fetch(work[i + 1][0]["name"], work[i + 1][2]) if i + 1 < len(work) else None
            self._update(group, items, buf)
            self._write_back(group["name"], buf, device)
            if previous is not None:
                self._release(*previous)
            previous = (buf, device)
        if previous is not None:
            self._release(*previous)
        for _, d2h in self._streams.values():
            # the host store must hold this step's state before anyone reads it (next step, state_dict)
            d2h.synchronize()
        return loss

    def _cuda_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _fetch(self, key: str, device: torch.device) -> tuple[Tensor, torch.cuda.Event | None]:
        """Starts bringing a group's state to ``device``; returns the buffer and the event marking its arrival."""
        host = self._store.get(key)
        size = 2 * self._numel[key]
        ready = None
        if device.type == "cuda":
            h2d, _ = self._cuda_streams(device)
            # allocating on the side stream ties the block to it in the caching allocator; the compute and D2H
            # streams that use it later are covered by the event wait below and record_stream in _release
            with torch.cuda.stream(h2d):
                if host is None:
                    buf = torch.zeros(size, device=device)
                else:
                    buf = torch.empty(size, device=device)
                    # non_blocking: the host store is pinned, so this runs async while the previous group updates
                    buf.copy_(host, non_blocking=True)
                # marks the buffer complete; the compute stream waits on it before the update
                ready = h2d.record_event()
        else:  # a distinct working copy even when device and host are both the CPU
            buf = torch.zeros(size, device=device) if host is None else host.to(device, copy=True)
        if host is None:  # first use: the write-back fills the host store
            self._store[key] = torch.zeros(size, pin_memory=self._pin)
        self._live_bytes += buf.nbytes
        self._peak_bytes = max(self._peak_bytes, self._live_bytes)
        return buf, ready

    def _write_back(self, key: str, buf: Tensor, device: torch.device) -> None:
        host = self._store[key]
        if device.type != "cuda":
            host.copy_(buf)
            return
        _, d2h = self._cuda_streams(device)
        # marks the end of this group's update on the compute stream
        done = torch.cuda.current_stream(device).record_event()
        with torch.cuda.stream(d2h):
            # the copy must read the state only after the update has written it
            d2h.wait_event(done)
            # non_blocking: runs while the next group updates; step() ends with d2h.synchronize()
            host.copy_(buf, non_blocking=True)

    def _release(self, buf: Tensor, device: torch.device) -> None:
        if device.type == "cuda":
            # no reuse of the block before the D2H copy (which waited for the update) has read it
            buf.record_stream(self._cuda_streams(device)[1])
        self._live_bytes -= buf.nbytes

    def _update(self, group: dict[str, Any], items: list[tuple[str, Tensor]], buf: Tensor) -> None:
        """One AdamW step of ``items`` with torch's functional AdamW, state viewed out of ``buf``."""
        half = self._numel[group["name"]]
        params, grads, exp_avgs, exp_avg_sqs, steps, casts = [], [], [], [], [], []
        for name, p in items:
            _, offset, numel = self._slot[name]
            exp_avgs.append(buf[offset:offset + numel].view(p.shape))
            exp_avg_sqs.append(buf[half + offset:half + offset + numel].view(p.shape))
            if name not in self._steps:  # fresh state, as torch.optim.AdamW makes it: a 0-dim fp32 CPU tensor
                self._steps[name] = torch.tensor(0.0, dtype=torch.float32)
            steps.append(self._steps[name])
            if p.dtype == torch.float32:
                params.append(p)
                grads.append(p.grad)
            else:  # fp32 state needs fp32 math; the result is rounded back into the parameter
                casts.append((p, p.detach().float()))
                params.append(casts[-1][1])
                grads.append(p.grad.float())
        beta1, beta2 = group["betas"]
        # foreach/fused None: the same kernel choice torch.optim.AdamW makes by default for these tensors
        _functional_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=None, fused=None,
                         amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                         eps=group["eps"], maximize=False, decoupled_weight_decay=True)
        for p, p32 in casts:
            p.copy_(p32)

    def reset_state(self, keys: str | Iterable[str]) -> None:
        """Drops the moments and step counts of the given group keys or parameter names (a fresh start).

        Raises:
            ValueError: If a key is neither a group key nor a parameter name; nothing is reset then.
        """
        keys = [keys] if isinstance(keys, str) else list(keys)
        unknown = [k for k in keys if k not in self._numel and k not in self._slot]
        if unknown:
            raise ValueError(f"reset_state: unknown group keys or parameter names: {unknown}")
        for key in keys:
            if key in self._numel:  # a whole group: free its store
                self._store.pop(key, None)
                for name, (group_key, _, _) in self._slot.items():
                    if group_key == key:
                        self._steps.pop(name, None)
            else:
                group_key, offset, numel = self._slot[key]
                store = self._store.get(group_key)
                if store is not None:
                    half = self._numel[group_key]
                    store[offset:offset + numel].zero_()
                    store[half + offset:half + offset + numel].zero_()
                self._steps.pop(key, None)

    def memory_report(self) -> dict[str, int | bool]:
        """Optimizer-state bytes: on the device now, peak on the device during the last step, in the host store.

        Step counts (4 bytes per parameter) count with the store: host with offload, device without.
        """
        store = sum(t.nbytes for t in self._store.values()) + sum(t.nbytes for t in self._steps.values())
        if not self._offload:
            return {"device_state_bytes": store, "peak_device_state_bytes": store,
                    "host_state_bytes": 0, "host_pinned": False}
        return {"device_state_bytes": self._live_bytes, "peak_device_state_bytes": self._peak_bytes,
                "host_state_bytes": store,
                "host_pinned": self._pin and all(t.is_pinned() for t in self._store.values())}

    def state_dict(self) -> dict[str, Any]:
        """State keyed by parameter name, as CPU copies; loads with ``torch.load(weights_only=True)``.

        Returns:
            ``{"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{hyperparameters...,
            "name": key, "param_names": [...]}]}``; only parameters that have taken a step have an entry.
        """
        state = {}
        for name, step in self._steps.items():
            key, offset, numel = self._slot[name]
            store, half = self._store[key], self._numel[key]
            shape = self._by_name[name].shape
            state[name] = {"step": step.clone(),
                           "exp_avg": store[offset:offset + numel].view(shape).to("cpu", copy=True),
                           "exp_avg_sq": store[half + offset:half + offset + numel].view(shape).to("cpu", copy=True)}
        groups = []
        for group in self.param_groups:
            entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            entry["param_names"] = list(group["param_names"])
            groups.append(entry)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replaces all state and hyperparameters with those of ``state_dict`` (as made by :meth:`state_dict`).

        Raises:
            ValueError: If names are missing from or unexpected in ``state_dict`` (all are listed), or a tensor
                has the wrong shape; the optimizer is unchanged then.
        """
        loaded_groups = state_dict["param_groups"]
        loaded_state = state_dict["state"]
        group_of = {n: g for g in loaded_groups for n in g["param_names"]}
        missing = [n for n in self._slot if n not in group_of]
        unexpected = sorted((set(group_of) | set(loaded_state)) - set(self._slot))
        if missing or unexpected:
            raise ValueError("optimizer state dict does not match the optimizer's parameters: "
                             f"missing names (in the optimizer, not in the state dict): {missing}; "
                             f"unexpected names (in the state dict, not in the optimizer): {unexpected}")
        bad = [f"{n}.{k}: expected shape {tuple(self._by_name[n].shape)}, got {tuple(s[k].shape)}"
               for n, s in loaded_state.items() for k in ("exp_avg", "exp_avg_sq")
               if tuple(s[k].shape) != tuple(self._by_name[n].shape)]
        if bad:
            raise ValueError(f"optimizer state dict has tensors of the wrong shape: {bad}")
        for group in (g for g in self.param_groups if g["param_names"]):
            source = group_of[group["param_names"][0]]
            for k, v in source.items():
                if k not in ("params", "param_names", "name"):
                    group[k] = tuple(v) if k == "betas" else v
        self._store.clear()
        self._steps.clear()
        for name, s in loaded_state.items():
            key, offset, numel = self._slot[name]
            half = self._numel[key]
            if key not in self._store:
                store = torch.zeros(2 * half, pin_memory=self._pin) if self._offload else \
                    torch.zeros(2 * half, device=self._by_name[name].device)
                self._store[key] = store
            store = self._store[key]
            store[offset:offset + numel].copy_(s["exp_avg"].reshape(-1))
            store[half + offset:half + offset + numel].copy_(s["exp_avg_sq"].reshape(-1))
            self._steps[name] = torch.as_tensor(s["step"], dtype=torch.float32).detach().cpu().clone()
