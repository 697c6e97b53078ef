"""Batched decoding over a slot KV cache, each decode step replayed from CUDA graphs.

    decoder = runtime.decoder(max_batch=16, max_len=2048)
    logits = decoder.prefill(row=0, ids=[...])       # [V]: the prompt's next-token logits
    logits = decoder.prefill_rows({1: [...], 2: [...]})  # [2,V]: several prompts, one forward a chunk
    logits = decoder.decode({0: token, 3: token})    # [2,V]: one step of rows 0 and 3
    logits = decoder.decode_queued([0, 3], tokens)   # [4,V]: the same, tokens [>=4] on the device, nothing read
    decoder.release(0)                               # the row is free for another sequence
    decoder.generate(ids, max_new_tokens=64)         # [B,T] -> [B,T+N], greedy

Legend: B rows in a step, N attended positions, V vocabulary, L MoE layers, K top-k.

A decode step feeds every row below its batch size (rows without a sequence decode
padding, which is ignored), so steps come in a few shapes: batch sizes of BATCH_SIZES up
to max_batch, attended lengths rounded up to LENGTH_STEP. On CUDA the first step of a
shape runs eagerly (it is the real step) and is then captured; later steps of that shape
replay the capture: no Python, no per-kernel launches.

A captured step is split where the host must act: at every MoE layer whose experts are
not all resident for good, after its router has chosen. Between the pieces the host reads
that layer's choice (one synchronisation), makes the experts resident (`ExpertCache.acquire`:
hits cost nothing, misses queue copies that the next piece waits for on the device), and
replays the next piece, which computes the experts from the slot buffers through the
cache's device table. When the budget holds every expert a step is one graph.

The routing of every MoE layer is gathered on the device into one buffer per step and
copied to the host once, after the step, for the runtime's routing listeners; with
`defer_routing` the copy is only queued, and the caller emits it later (take_routing), so a
server can queue the next step before it reads this one's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .experts import EAGER, ExpertLayer, StepHooks, distinct_experts
from .kv_cache import SlotCache
from .loading import cache_keyword, expert_layers

log = logging.getLogger("cadre.decoder")

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTH_STEP = 256  # attended lengths are rounded up to this: few shapes, few captures
PREFILL_CHUNK = 512  # prompt tokens per prefill forward
# A captured step's first replay and the eager step run the same kernels, so they agree to
# rounding (cuBLAS may pick another algorithm inside a capture); stale host state captured
# into a graph shows as whole different logits.
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def unsupported_reason(model) -> str | None:
    """Why this model cannot decode over a slot cache (None: it can)."""
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)}: the slot cache holds full attention only"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention: the slot cache holds full attention only"
    return None


@dataclass
class _Split:
    """A captured step's pause at one MoE layer: the tensors the host reads there."""

    layer: ExpertLayer
    index: torch.Tensor  # [B,K] that layer's choice, in the graphs' memory
    hidden: torch.Tensor  # [B,H] its input (for speculative prefetch)
    # With speculation: the deeper layers predicted here, and [B, K + layers*K] = index beside their
    # predicted experts (ExactPolicy.predict_ahead), computed in the piece: one host read for both
    ahead: list[int] | None = None
    read: torch.Tensor | None = None

    def routing(self) -> tuple[list[int], list[tuple[int, int]]]:
        """This layer's distinct experts, sorted, and the deeper layers' predicted (layer, expert)
        keys, best first: one synchronisation (the piece before must have been replayed)."""
        if self.ahead is None:
            return self.layer.needed(self.index), []
        top_k = self.index.shape[-1]
        rows = self.read.tolist()
        needed = distinct_experts(e for row in rows for e in row[:top_k])
        predicted = {}  # the nearest layer first; in it rank by rank over the rows (a dict keeps the first)
        for d, deeper in enumerate(self.ahead):
            start = top_k * (d + 1)
            for rank in range(top_k):
                predicted.update({(deeper, row[start + rank]): None for row in rows})
        return needed, list(predicted)


@dataclass
class _CapturedStep:
    pieces: list  # torch.cuda.CUDAGraph, replayed in order with the splits between them
    splits: list[_Split]
    input_ids: torch.Tensor  # [B,1] static inputs
    positions: torch.Tensor  # [B,1]
    logits: torch.Tensor  # [B,V] static output
    routing: tuple[list[int], torch.Tensor, torch.Tensor] | None  # MoE layers, [L,B,K] experts, weights
    outcomes: list = field(default_factory=list)
    verified: bool = False  # its first replay matched an eager step (see Decoder._verify)


@dataclass
class SplitTimes:
    """Host time at the splits of replayed decode steps, summed: waiting for a layer's routing
    (the synchronisation, GPU time the host cannot use), deciding and queuing its loads (GPU
    idle unless copies or compute are still queued), then queuing the next piece and the
    write-backs (overlapped with the copies and compute)."""

    splits: int = 0
    sync_s: float = 0.0
    issue_s: float = 0.0
    after_s: float = 0.0

    def add(self, sync: float, issue: float, after: float) -> None:
        self.splits += 1
        self.sync_s, self.issue_s, self.after_s = self.sync_s + sync, self.issue_s + issue, self.after_s + after

    def per_split_us(self) -> dict[str, float] | None:
        if not self.splits:
            return None
        return {name: 1e6 * getattr(self, f"{name}_s") / self.splits for name in ("sync", "issue", "after")}


class _CaptureHooks(StepHooks):
    """During capture: end the current piece where the host must act, start the next."""

    def __init__(self, decoder: "Decoder", pieces: list):
        self.decoder, self.pieces = decoder, pieces
        self.splits: list[_Split] = []
        self.routes: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def resident(self, layer, index, hidden):
        split = _Split(layer, index, hidden)
        predict_ahead = getattr(self.decoder.runtime.policy, "predict_ahead", None)
        if layer.before is not None and predict_ahead is not None:  # speculation, predicted in the graph
            predicted = predict_ahead(layer.layer, hidden)
            if predicted is not None:
                split.ahead, columns = predicted
                split.read = torch.cat([index, columns], dim=-1)  # [B, K + layers*K]
        self.pieces[-1].capture_end()
        self.pieces.append(torch.cuda.CUDAGraph())
        self.pieces[-1].capture_begin(pool=self.decoder.pool)
        self.splits.append(split)
        return _WholeBuffer(layer.cache.all_slots())

    def release(self, layer, lease) -> None:
        pass  # the replay releases what the host pinned at this split

    def route(self, layer, index, weights, outcomes, stall) -> None:
        self.routes.append((layer.layer, index, weights))


@dataclass
class _WholeBuffer:
    """What a captured piece computes over: every slot, looked up through the table."""

    range: tuple[int, int]
    complete: bool = True
    empty: bool = False  # the captured piece computes whatever the replay routes

    def slot_range(self) -> tuple[int, int]:
        return self.range


class Decoder:
    def __init__(self, runtime, max_batch: int, max_len: int, use_graphs: bool | None = None):
        reason = unsupported_reason(runtime.model)
        if reason is not None:
            raise ValueError(f"{runtime.store.root}: cannot decode over a slot cache: {reason}")
        self.runtime, self.model = runtime, runtime.model
        self.device = runtime.device
        self.max_batch, self.max_len = max_batch, max_len
        on_cuda = self.device.type == "cuda"
        capturable = getattr(runtime.policy, "capturable", False)
        if use_graphs and not capturable:
            raise ValueError(f"routing policy {runtime.policy.name!r} works on the host inside the forward: "
                             "its steps cannot be captured as CUDA graphs")
        self.use_graphs = on_cuda and capturable if use_graphs is None else use_graphs
        if self.use_graphs and not on_cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        if on_cuda and not self.use_graphs:
            log.warning("decode steps run eagerly (no CUDA graphs): routing policy %r", runtime.policy.name)
        self.kv = SlotCache(self.model.config.num_hidden_layers, max_batch, max_len, self.device)
        self.lengths = [0] * max_batch  # tokens in each row's cache
        self.layers = expert_layers(self.model)
        self._cache_kwarg = cache_keyword(self.model)
        self._arange = torch.arange(max_batch, device=self.device)
        self._steps: dict[tuple[int, int], _CapturedStep] = {}
        self.split_times = SplitTimes()  # host time at the splits of replayed steps (bench reads it)
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._speculation_stream: torch.cuda.Stream | None = None  # see _speculate
        # A replayed step's routing is copied to the host behind it and emitted by whoever takes
        # it (take_routing), not read at once: the server queues the next step first.
        self.defer_routing = False
        self._pending_routing: Callable[[], None] | None = None
        self._step_logits = self._compiled_step() if runtime.config.compile_step else self._logits

    def _compiled_step(self):
        """The one-token step's forward compiled (RuntimeConfig(compile_step=True)): inductor
        fuses the norms, RoPE, routing and activations that the eager forward launches as
        separate small kernels, and the decoder captures the compiled kernels in its graphs.
        Only where every layer's experts are resident for good: a layer that can miss does
        host work inside the forward. One compile per (batch, attended length) shape, done
        by the eager first step of that shape, before its capture."""
        if not self.runtime.cache.holds_everything:
            log.warning("compile_step: the budget does not hold every expert (layers can miss): not compiled")
            return self._logits
        shapes = len([b for b in BATCH_SIZES if b <= self.max_batch]) * -(-self.max_len // LENGTH_STEP)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, shapes + 8)
        top_k = self.runtime.store.top_k
        self._route_buffers = {
            number: (torch.zeros((self.max_batch, top_k), dtype=torch.long, device=self.device),
                     torch.zeros((self.max_batch, top_k), dtype=torch.float32, device=self.device))
            for number in self.layers}
        compiled = torch.compile(self._logits, dynamic=False)

        def step(input_ids, positions, mask):  # [B,1], [B,1], [B,1,1,N] -> logits [B,V]
            for number, layer in self.layers.items():
                layer.route_buffers = self._route_buffers[number]
            try:
                logits = compiled(input_ids, positions, mask)
            finally:
                for layer in self.layers.values():
                    layer.route_buffers = None
            rows = input_ids.shape[0]
            for number, layer in self.layers.items():  # the hooks hear the step's routing, as uncompiled
                index, weights = self._route_buffers[number]
                layer.hooks.route(layer, index[:rows], weights[:rows], layer.outcomes, layer.stall)
                if layer.hit_sink is not None:  # every layer is complete here (see above)
                    layer.hit_sink.append((layer.layer, index[:rows]))
            return logits
        return step

    # --- the forward ----------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, write_rows: torch.Tensor, positions: torch.Tensor,
                 read_rows: slice | torch.Tensor, attend_len: int) -> torch.Tensor:
        """input_ids [B,Q] at positions [B,Q] of rows write_rows [B] -> last-token logits [B,V]."""
        self.kv.prepare(write_rows, positions, read_rows, attend_len)
        if input_ids.shape[1] > 1:  # prefill stays eager
            return self._logits(input_ids, positions, self.kv.attention_mask())
        sink = []  # the complete layers' lookups, counted once for the step
        for layer in self.layers.values():
            layer.hit_sink = sink
        try:
            logits = self._step_logits(input_ids, positions, self.kv.attention_mask())
        finally:
            for layer in self.layers.values():
                layer.hit_sink = None
        self.runtime.cache.count_step_hits(sink)
        return logits

    def _logits(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=True,
                         logits_to_keep=1, **{self._cache_kwarg: self.kv})
        return out.logits[:, -1]

    # --- prefill ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, row: int, ids: list[int], before_forward=None) -> torch.Tensor:
        """Fill `row` with the prompt `ids` (eagerly, in chunks); its next-token logits [V]."""
        return self.prefill_rows({row: ids}, before_forward)[0]

    @torch.inference_mode()
    def prefill_rows(self, prompts: dict[int, list[int]], before_forward=None) -> torch.Tensor:
        """Fill several rows {row: prompt ids} together -> their next-token logits [n,V], in order.

        One forward per chunk for all the prompts, so a layer's experts are made resident once
        for every prompt's tokens, not once per prompt (under a small budget a cold prefill
        streams most of a layer's experts). Chunks are counted back from each prompt's end:
        every forward's last column is each of its rows' latest token, and a shorter prompt
        joins only the last chunks, right-aligned, padded on the left. A padding token writes
        its keys at the row's last position (max_len - 1: no prompt token reads it, and a real
        token writes it before any reads it) and routes to no expert (ExpertLayer.token_mask).
        `before_forward(spans, width)` is called before each forward with its rows' spans
        [(row, start, end)] of their prompts, right-aligned in `width` columns."""
        for row, ids in prompts.items():
            self.check_prompt(row, ids)
        ends = {row: len(ids) for row, ids in prompts.items()}
        for back in range(-(-max(ends.values()) // PREFILL_CHUNK) - 1, -1, -1):  # chunks from the end
            spans = [(row, max(0, end - (back + 1) * PREFILL_CHUNK), end - back * PREFILL_CHUNK)
                     for row, end in ends.items() if end > back * PREFILL_CHUNK]
            width = max(stop - start for _, start, stop in spans)
            if before_forward is not None:
                before_forward(spans, width)
            logits = self._prefill_forward(prompts, spans, width)
        for row, end in ends.items():
            self.lengths[row] = end
        return logits

    def check_prompt(self, row: int, ids: list[int]) -> None:
        """ValueError unless `row` exists and can hold the prompt `ids` and one more token."""
        if not 0 <= row < self.max_batch:
            raise ValueError(f"row {row} outside [0, {self.max_batch})")
        if not 0 < len(ids) < self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens: the cache holds 1 to {self.max_len - 1}")

    def _prefill_forward(self, prompts: dict[int, list[int]], spans: list[tuple[int, int, int]],
                         width: int) -> torch.Tensor:
        """One forward of `spans` [(row, start, end)], each right-aligned in `width` columns -> [B,V]."""
        ids, positions, real = [], [], []
        for row, start, end in spans:
            pad = width - (end - start)
            ids.append(prompts[row][start:start + 1] * pad + prompts[row][start:end])
            positions.append([self.max_len - 1] * pad + list(range(start, end)))
            real.append([False] * pad + [True] * (end - start))
        rows = [row for row, _, _ in spans]
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        write_rows = self._arange[rows[0]:rows[0] + len(rows)] if contiguous else torch.tensor(rows, device=self.device)
        mask = torch.tensor(real, device=self.device).reshape(-1) if not all(map(all, real)) else None  # [B*W]
        for layer in self.layers.values():
            layer.token_mask = mask
        try:
            return self._forward(torch.tensor(ids, device=self.device), write_rows,
                                 torch.tensor(positions, device=self.device),
                                 slice(rows[0], rows[0] + len(rows)) if contiguous else write_rows,
                                 max(end for _, _, end in spans))
        finally:
            for layer in self.layers.values():
                layer.token_mask = None

    def release(self, row: int) -> None:
        self.lengths[row] = 0

    # --- decode -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: dict[int, int]) -> torch.Tensor:
        """One token for each row of `tokens` {row: its last token} -> logits [len(tokens),V] in row order."""
        rows = sorted(tokens)
        by_row = torch.zeros(self.max_batch, dtype=torch.long)  # rows not given decode padding
        by_row[rows] = torch.tensor([tokens[r] for r in rows])
        return self._decode_rows(rows, by_row)[rows]

    @torch.inference_mode()
    def decode_queued(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One token for each of `rows` (sorted), whose last tokens are read on the device from
        `tokens` [>= batch], indexed by row (the previous step's argmax, say) -> logits [batch,V]
        of the whole padded step, indexed by row. Nothing is read on the host and nothing waits
        for the device, so the caller can read the last step's tokens while this one runs
        (the server's decode loop); the rows below the batch size that are not in `rows` decode
        padding, as in decode()."""
        return self._decode_rows(rows, tokens)

    def _decode_rows(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """The step of decode() and decode_queued(): `tokens` [>= batch] by row, on the host or the
        device -> logits [batch,V] by row."""
        batch, attend = self._shape(rows)
        positions = torch.zeros((batch, 1), dtype=torch.long)
        for r in rows:
            positions[r, 0] = self.lengths[r]
        logits = self._step(batch, attend, tokens[:batch].view(batch, 1), positions)
        for r in rows:
            self.lengths[r] += 1
        return logits

    def take_routing(self) -> Callable[[], None] | None:
        """With defer_routing: the last replayed step's routing, as a call that waits for its copy
        and hands it to the runtime's listeners (None: that step emitted its routing as it ran,
        or no one listens)."""
        pending, self._pending_routing = self._pending_routing, None
        return pending

    @torch.inference_mode()
    def decode_first(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for rows 0..n-1 of equal length, from their last tokens as a device tensor [n]
        (the last step's argmax: never read on the host) -> logits [n,V]. No host synchronisation
        and no host-to-device copy, so the host queues the next step while the GPU runs this one
        (gpt-fast's loop); decode() copies its tokens from the host."""
        rows = list(range(tokens.shape[0]))
        length = self.lengths[0]
        assert all(self.lengths[r] == length for r in rows), "decode_first: rows of unequal length"
        batch, attend = self._shape(rows)
        step = self._steps.get((batch, attend))
        if step is not None and step.verified and batch == len(rows):
            # straight into the captured step's inputs: two small kernels outside the graph, not five
            self._pending_routing = None
            step.input_ids[:, 0].copy_(tokens)
            step.positions.fill_(length)
            logits = self._replay(step)
        else:
            input_ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
            input_ids[:len(rows), 0] = tokens
            positions = torch.full((batch, 1), length, dtype=torch.long, device=self.device)  # a fill: no copy
            logits = self._step(batch, attend, input_ids, positions)
        for r in rows:
            self.lengths[r] += 1
        return logits[:len(rows)]

    def _shape(self, rows: list[int]) -> tuple[int, int]:
        """The step shape (batch size, attended length) that holds `rows` (sorted) and one more token each."""
        batch = next(b for b in BATCH_SIZES if b >= rows[-1] + 1) if rows[-1] < BATCH_SIZES[-1] else rows[-1] + 1
        batch = min(batch, self.max_batch)
        longest = max(self.lengths[r] for r in rows) + 1
        if longest > self.max_len:
            raise ValueError(f"row {max(rows, key=lambda r: self.lengths[r])} is full ({self.max_len} tokens)")
        return batch, min(self.max_len, -(-longest // LENGTH_STEP) * LENGTH_STEP)

    def _step(self, batch: int, attend: int, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._pending_routing = None  # only this step's routing can be taken after it
        step = self._steps.get((batch, attend))
        if step is not None:
            logits = self._replay(step, input_ids, positions)
            return logits if step.verified else self._verify(step, batch, attend, input_ids, positions, logits)
        # non-blocking: a host tensor is staged at once, and nothing waits for the device
        input_ids, positions = input_ids.to(self.device, non_blocking=True), positions.to(self.device, non_blocking=True)
        logits = self._forward(input_ids, self._arange[:batch], positions, slice(0, batch), attend)
        if self.use_graphs and self._capturable(batch):
            step = self._capture(batch, attend)
            if step is not None:
                self._steps[(batch, attend)] = step
        return logits

    def _verify(self, step: _CapturedStep, batch: int, attend: int, input_ids, positions, replayed) -> torch.Tensor:
        """A captured step's first replay against the same step run eagerly (it rewrites the
        same keys and values). A model whose forward reads host state at capture time (a
        Python int, a CPU tensor copied once) would replay stale values silently; a mismatch
        turns capture off for this decoder, logged. The eager step's routing is not emitted
        again, and its cache traffic is counted (one extra step per captured shape)."""
        replayed = replayed.clone()
        with self.runtime.routing_muted():
            eager = self._forward(input_ids.to(self.device), self._arange[:batch], positions.to(self.device),
                                  slice(0, batch), attend)
        tolerance = VERIFY_TOLERANCE.get(replayed.dtype, 2e-2)
        if torch.allclose(replayed.float(), eager.float(), rtol=tolerance, atol=tolerance):
            step.verified = True
            return replayed
        diff = float((replayed.float() - eager.float()).abs().max())
        self._disable_graphs(f"the captured step (batch {batch}, {attend} positions) differs from the eager "
                             f"step by up to {diff:.3g} in the logits")
        return eager

    def _disable_graphs(self, reason: str) -> None:
        log.warning("decode steps run eagerly from now on (no CUDA graphs) for %s: %s",
                    type(self.model).__name__, reason)
        self.use_graphs = False
        self._steps.clear()

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture the decode step of every batch size up to max_batch (attended length
        LENGTH_STEP) now, as a server does before it takes requests; returns how many."""
        if not self.use_graphs:
            return 0
        attend = min(self.max_len, LENGTH_STEP)
        for batch in (b for b in BATCH_SIZES if b <= self.max_batch):
            if (batch, attend) in self._steps or not self._capturable(batch):
                continue
            try:
                logits = [self.prefill(row, [0]) for row in range(batch)]
                self.decode({row: int(l.argmax()) for row, l in enumerate(logits)})
            finally:
                for row in range(batch):
                    self.release(row)
        return len(self._steps)

    def _capturable(self, batch: int) -> bool:
        """A captured step pins a layer's whole choice at once: it must fit the budget."""
        store = self.runtime.store
        return min(store.num_experts, batch * store.top_k) <= self.runtime.cache.num_slots

    # --- capture and replay -------------------------------------------------------------------------
    def _capture(self, batch: int, attend: int) -> _CapturedStep | None:
        input_ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        positions = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        pieces = [torch.cuda.CUDAGraph()]
        hooks = _CaptureHooks(self, pieces)
        self._set_hooks(hooks)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                pieces[0].capture_begin(pool=self.pool)
                try:
                    logits = self._forward(input_ids, self._arange[:batch], positions, slice(0, batch), attend)
                    routing = _stack_routing(hooks.routes)
                finally:
                    pieces[-1].capture_end()  # also on failure: a stream left capturing breaks every later call
        except RuntimeError as exc:  # the model's forward does something a graph cannot hold
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._disable_graphs(f"capture failed: {str(exc).splitlines()[0][:200]}")
            return None
        finally:
            self._set_hooks(EAGER)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        log.info("captured decode step: batch %d, %d positions, %d pieces", batch, attend, len(pieces))
        return _CapturedStep(pieces, hooks.splits, input_ids, positions, logits, routing)

    def _set_hooks(self, hooks: StepHooks) -> None:
        for layer in self.layers.values():
            layer.hooks = hooks

    def _replay(self, step: _CapturedStep, input_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Replay `step` on input_ids/positions [B,1] (None: already in the step's own inputs)."""
        if input_ids is not None:
            step.input_ids.copy_(input_ids, non_blocking=True)
            step.positions.copy_(positions, non_blocking=True)
        step.pieces[0].replay()
        outcomes, clock = {}, self.split_times
        for split, piece in zip(step.splits, step.pieces[1:]):
            layer = split.layer
            layer.outcomes, layer.stall = {}, 0.0
            started = time.perf_counter()
            needed, predicted = split.routing()  # waits for the GPU to reach this layer's router
            routed = time.perf_counter()
            # the loads go out first and the next piece right behind them; the speculative
            # loads of deeper layers and the write-backs of this layer's evictions are queued
            # after, while the GPU copies and computes
            lease = layer.acquire(needed, split.hidden, force=True, defer_writebacks=True, speculate=False)
            issued = time.perf_counter()
            piece.replay()
            if split.ahead is None:
                self._speculate(layer, split.hidden)  # while the lease still pins what the piece reads
            else:
                self.runtime.prefetch(predicted)
            layer.cache.release(lease)  # after the piece that computes with it is queued
            layer.cache.flush_writebacks()
            clock.add(routed - started, issued - routed, time.perf_counter() - issued)
            outcomes[layer.layer] = (layer.outcomes, layer.stall)
        if step.routing is not None and self.runtime.has_routing_listeners:
            if self.defer_routing:
                self._pending_routing = self._routing_copy(step.routing, outcomes)
            else:
                self.runtime.emit_step_routing(*step.routing, outcomes)
        return step.logits

    def _speculate(self, layer: ExpertLayer, hidden: torch.Tensor) -> None:
        """The speculative prefetch of a replayed split whose policy cannot predict inside the
        graph (no predict_ahead), once the next piece is queued: its prediction (a gate applied
        to this layer's input `hidden`, already computed: the host has read this layer's routing)
        runs on a stream of its own, so reading it waits for a few small kernels, not for the
        piece; its loads then overlap the piece's compute and the loads it waits for. Run before
        the piece, as it was, the prediction and the queuing of its loads left the GPU idle: ~1 ms
        a MoE layer at full depth (bench breakdown). Predicted inside the piece instead, it costs
        no synchronisation of its own (_Split.routing)."""
        if layer.before is None:
            return
        if self._speculation_stream is None:
            self._speculation_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._speculation_stream):
            layer.speculate(hidden)

    def _routing_copy(self, routing, outcomes) -> Callable[[], None]:
        """Queue a copy of a replayed step's routing [L,B,K] into pinned host memory (the capture's
        buffers are overwritten by the next replay, which the copy precedes on the stream); the
        returned call waits for it and emits it."""
        layers, experts, weights = routing
        (experts, _), (weights, copied) = copy_to_host_behind(experts), copy_to_host_behind(weights)

        def emit() -> None:
            copied.synchronize()  # (the later of the two copies on the stream)
            self.runtime.emit_step_routing(layers, experts, weights, outcomes)
        return emit

    # --- generation ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_ids=(), pad_token_id=None,
                 min_new_tokens: int = 0, on_prefilled: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Greedy continuation of equal-length prompts ids [B,T] -> [B,T+n], the tokens of
        transformers' generate(do_sample=False): a row that emits an EOS of `eos_token_ids`
        is done and padded (pad_token_id, else its EOS) until every row is, as there; and,
        as its min_new_tokens processor does, no EOS can be chosen before `min_new_tokens`.

        Tokens stay on the device: each step's argmax feeds the next step (decode_first), so
        the host never waits for a token and keeps a step queued ahead of the GPU. With EOS
        ids, whether every row is done is copied to the host behind each step and read one
        step late; a step decoded past the end is dropped. `on_prefilled(logits [B,V])` is called
        once the prompts' prefill is queued (a caller timing the first token synchronises there)."""
        batch = ids.shape[0]
        if batch > self.max_batch:
            raise ValueError(f"{batch} prompts > max_batch {self.max_batch}")
        eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=self.device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        try:
            logits = self.prefill_rows(dict(enumerate(ids.tolist())))  # [B,V]
            if on_prefilled is not None:
                on_prefilled(logits)
            generated = []  # [B] per step, on the device
            done = torch.zeros(batch, dtype=torch.bool, device=self.device)  # [B]
            # no watch where no EOS can be chosen (none given, or banned to the end): fewer kernels a step
            watch = _DoneWatch() if len(eos) and min_new_tokens < max_new_tokens else None
            for step in range(max_new_tokens):
                if step < min_new_tokens and len(eos):
                    logits = logits.index_fill(-1, eos, float("-inf"))  # out of place: may be a graph's output
                tokens = logits.argmax(dim=-1) if watch is None else torch.where(done, pad, logits.argmax(dim=-1))
                generated.append(tokens)
                if watch is not None:
                    done = done | torch.isin(tokens, eos)
                    if watch.push(done):  # every row was done a step ago: this step is past the end
                        break
                if step + 1 == max_new_tokens:
                    break
                logits = self.decode_first(tokens)
            if watch is not None:  # up to the step at which the last row finished
                generated = generated[:watch.end(len(generated))]
        finally:
            for row in range(batch):
                self.release(row)
        new = torch.stack(generated, dim=1).to(ids.device, ids.dtype)  # [B,n]: the one synchronisation
        return torch.cat([ids, new], dim=1)


class _DoneWatch:
    """Whether every row of a generation is done, read on the host one step late: each step's
    flags [B] are copied behind it into pinned memory (no wait), and the previous step's copy,
    long finished while this step was queued, is what the host reads."""

    def __init__(self):
        self._flags: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    def push(self, done: torch.Tensor) -> bool:
        """Queue this step's flags; True if every row was already done at the previous step."""
        self._flags.append(copy_to_host_behind(done))
        return len(self._flags) > 1 and self._all_done(len(self._flags) - 2)

    def end(self, steps: int) -> int:
        """Steps to keep: up to and including the first at which every row was done."""
        return next((i + 1 for i in range(steps) if self._all_done(i)), steps)

    def _all_done(self, step: int) -> bool:
        host, event = self._flags[step]
        if event is not None:
            event.synchronize()
        return bool(host.all())


def copy_to_host_behind(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A copy of `tensor` queued into pinned host memory behind the work on the current stream,
    and the event that says it landed (nothing waits now); on CPU a plain copy, and None."""
    if not tensor.is_cuda:
        return tensor.clone(), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    landed = torch.cuda.Event()
    landed.record()
    return host, landed


def _stack_routing(routes: list[tuple[int, torch.Tensor, torch.Tensor]]):
    """Every MoE layer's choice of this step in two device buffers [L,B,K] (inside the capture)."""
    if not routes:
        return None
    layers = [layer for layer, _, _ in routes]
    experts = torch.stack([index for _, index, _ in routes])
    weights = torch.stack([w.float() for _, _, w in routes])
    return layers, experts, weights
