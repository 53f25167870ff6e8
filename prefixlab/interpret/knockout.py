"""What the prefix does, measured: knockouts of slots and layers, and the labels values push.

A knockout hides part of the prefix and scores held-out rows again. "Hidden" means masked
out of attention: the attention mask of the chosen layers gets the chosen prefix slots set to
"not visible", so every query's softmax runs over the remaining keys exactly as if those
slots had never been cached there. Positions are untouched (the inputs still start at P), so
nothing else moves. The alternatives are not exact: zeroing a slot's value still takes
softmax mass from the other keys (its key still scores), and zeroing its key gives it score
0, which is a large share when the real scores are negative. Removing slots from the cache
would shift every later position, and with RoPE change every input token's keys.

- slot knockout s: slot s hidden at every layer (what that virtual token carries, all layers);
- layer knockout l: every slot hidden at layer l only (what the prefix does at that layer).

The masking runs on a *twin* of the model (the same parameter tensors, its own modules with
the mask hooks), so requests running on the shared model meanwhile are never affected.
Scoring is a callable on the model, so any per-row score (label log-likelihoods for a
classifier, a target's log-likelihood for generation) can be knocked out the same way.
"""

from __future__ import annotations

import copy
import queue
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from prefixlab.engine.balance import macro_f1
from prefixlab.engine.cpu import one_thread_here
from prefixlab.engine.families import family_of
from prefixlab.engine.models import LoadedModel, get_module
from prefixlab.interpret.attention import weight_sharing_copy
from prefixlab.interpret.frame import InterpretError, _check_kv
from prefixlab.interpret.values import value_logits

Score = Callable[[torch.nn.Module], np.ndarray]  # model -> (N, K) log-likelihoods per row

_Twins = dict[tuple[torch.dtype, int], torch.nn.Module]  # (dtype, stream) -> twin
_TWINS: weakref.WeakKeyDictionary[torch.nn.Module, _Twins] = weakref.WeakKeyDictionary()
_CAST: weakref.WeakKeyDictionary[torch.nn.Module, dict[torch.dtype, dict[int, torch.Tensor]]] = (
    weakref.WeakKeyDictionary())  # model -> dtype -> {id(model parameter): its cast copy}
_TWINS_LOCK = threading.Lock()
_HIDDEN = "_prefixlab_hidden_slots"  # twin attribute: {layer: [prefix slots hidden there]}
_REPLAY = "_prefixlab_replay"  # twin decoder-layer attribute: the Replay it follows, or None


def _hide_slots(layer: int):
    """A forward pre-hook for layer `layer`'s attention: hide the slots the twin names."""

    def hook(module, args, kwargs):
        hidden = getattr(module, _HIDDEN, {}).get(layer)
        if not hidden:
            return None
        mask = kwargs.get("attention_mask")
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        B, q = hidden_states.shape[:2]
        if mask is None:
            # transformers drops the mask when nothing is masked and q == 1 (decoding a token):
            # every cached key is then visible.
            if q != 1:
                raise InterpretError("cannot hide prefix slots: the model gave no attention mask")
            cache = kwargs.get("cache") or kwargs.get("past_key_values")
            length = cache.get_seq_length(layer) + 1
            mask = torch.ones(B, 1, 1, length, dtype=torch.bool, device=hidden_states.device)
        mask = mask.expand(B, *mask.shape[1:]).clone()  # (B, 1, q, P + T), own copy
        columns = torch.tensor(hidden, device=mask.device)
        if mask.dtype == torch.bool:
            mask[..., columns] = False
        else:  # additive float mask (eager attention)
            mask[..., columns] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    return hook


class Replay:
    """The intact pass's layer outputs, call by call, so that a pass which changes nothing
    below layer s can start there (a layer knockout at s leaves layers 0..s-1 as they were).

    `record` keeps every layer's output of each forward call (in call order) on the twin;
    `start(s)` makes the next calls skip layers 0..s-1 and hand layer s the output layer s-1
    gave in the same call of the recording. Exact when the scoring repeats the same forward
    calls in the same order, each reading its whole input in one call (no cache carried to a
    later call: the skipped layers do not append to it).
    """

    def __init__(self) -> None:
        self.outputs: dict[int, list] = {}  # layer -> its output per forward call
        self.recording = False
        self.begin = 0  # first layer computed; 0: every layer runs
        self.calls: dict[int, int] = {}  # layer -> calls seen since start()

    def start(self, layer: int) -> None:
        self.recording, self.begin, self.calls = False, layer, {}

    def record(self) -> None:
        self.outputs, self.recording, self.begin, self.calls = {}, True, 0, {}

    def view(self, layer: int) -> Replay:
        """Another Replay over the same recording, started at `layer` (one per stream)."""
        other = Replay()
        other.outputs = self.outputs
        other.start(layer)
        return other


def _replayable(block: torch.nn.Module, index: int):
    """The twin's forward for decoder layer `index`, which follows the twin's Replay."""
    run = block.forward

    def forward(*args, **kwargs):
        replay = getattr(block, _REPLAY, None)
        if replay is None:
            return run(*args, **kwargs)
        if replay.recording:
            out = run(*args, **kwargs)
            replay.outputs.setdefault(index, []).append(out)  # a fresh tensor: kept as is
            return out
        if index >= replay.begin:
            return run(*args, **kwargs)
        call = replay.calls.get(index, 0)
        replay.calls[index] = call + 1
        return replay.outputs[index][call]  # what this layer gave in the same call, intact

    return forward


def _twin(model: torch.nn.Module, dtype: torch.dtype | None = None,
          stream: int = 0) -> torch.nn.Module:
    """The model's knockout twin number `stream`: own modules with the masking hooks. Of the
    model's own dtype it shares every tensor; of another (bfloat16, to knock out faster) it
    uses a copy of the parameters in that dtype (+2 bytes per parameter, kept with the model,
    one copy for every stream) and shares the buffers (RoPE's frequencies stay float32)."""
    dtype = dtype or next(model.parameters()).dtype
    with _TWINS_LOCK:
        twins = _TWINS.setdefault(model, {})
        twin = twins.get((dtype, stream))
        if twin is None:
            if dtype == next(model.parameters()).dtype:
                twin = weight_sharing_copy(model)  # its linears are the model's (oneDNN on CPU)
            else:
                cast = _CAST.setdefault(model, {})
                if dtype not in cast:
                    cast[dtype] = {id(t): torch.nn.Parameter(t.detach().to(dtype),
                                                             requires_grad=False)
                                   for t in model.parameters()}
                memo = {**cast[dtype], **{id(t): t for t in model.buffers()}}
                twin = copy.deepcopy(model, memo=memo)
            family = family_of(twin.config)
            for i, block in enumerate(get_module(twin, family.layers)):
                attention = getattr(block, family.attention)
                attention.register_forward_pre_hook(_hide_slots(i), with_kwargs=True)
                block.forward = _replayable(block, i)  # the twin's own modules: ours to change
            twin._prefixlab_lock = threading.Lock()  # one knockout at a time per twin
            twins[(dtype, stream)] = twin
        return twin


@contextmanager
def knocked_out(loaded: LoadedModel, hidden: Mapping[int, Sequence[int]],
                replay: Replay | None = None, dtype: torch.dtype | None = None,
                stream: int = 0):
    """A model (the twin) on which prefix slots hidden[l] are masked out of layer l's attention.

    Yields the model to score with; the shared model is never changed. replay: a Replay to
    record into or to start from (see Replay). dtype: the twin's (None: the model's own).
    stream: which twin, so that several knockout passes can run at once.
    """
    twin = _twin(loaded.model, dtype, stream)
    family = family_of(twin.config)
    blocks = get_module(twin, family.layers)
    with twin._prefixlab_lock:
        attentions = [getattr(b, family.attention) for b in blocks]
        for i, attention in enumerate(attentions):
            setattr(attention, _HIDDEN, {i: list(hidden.get(i, ()))})
        for block in blocks:
            setattr(block, _REPLAY, replay)
        try:
            yield twin
        finally:
            for attention in attentions:
                setattr(attention, _HIDDEN, {})
            for block in blocks:
                setattr(block, _REPLAY, None)


def _measure(ll: np.ndarray, gold: np.ndarray | None) -> tuple[float, float | None]:
    """Mean log-probability of the correct answer, and macro-F1 (None without classes).

    ll (N, K): with K > 1 a classifier's label log-likelihoods, normalized over the labels;
    with K == 1 (gold None) a target's log-likelihood per row, averaged.
    """
    if gold is None:
        return float(ll[:, 0].mean()), None
    logp = torch.log_softmax(torch.from_numpy(ll), dim=-1).numpy()
    return (float(logp[np.arange(len(gold)), gold].mean()),
            macro_f1(gold, ll.argmax(1), range(ll.shape[1])))


@dataclass
class Knockout:
    """Changes when parts of the prefix are hidden, on `rows` held-out rows.

    Effects are knocked-out minus intact: a negative log_prob change means that part helps.
    """

    rows: int
    prefix_length: int
    num_layers: int
    log_prob: float  # intact: mean log p(correct answer)
    f1: float | None  # intact macro-F1 (None for generation targets)
    slot_log_prob: np.ndarray  # (P,) change when slot p is hidden at every layer
    slot_f1: np.ndarray | None  # (P,)
    layer_log_prob: np.ndarray  # (L,) change when every slot is hidden at layer l
    layer_f1: np.ndarray | None  # (L,)
    all_log_prob: float  # change when the whole prefix is hidden (the bare model)
    all_f1: float | None
    precision: str = "float32"  # the dtype every pass ran in (intact and knocked out alike)
    ablation: str = "hide"  # "hide": masked out of attention; "reset": set back to its start

    def ranked(self, part: str) -> list[tuple[int, float]]:
        """(index, log_prob change) of slots or layers, the most costly knockout first."""
        changes = self.slot_log_prob if part == "slot" else self.layer_log_prob
        return [(int(i), float(changes[i])) for i in np.argsort(changes, kind="stable")]

    def to_json(self) -> dict:
        def r(x):
            return None if x is None else np.round(np.asarray(x, dtype=float), 5).tolist()

        return {"format": "prefixlab-knockout/1", "rows": self.rows,
                "prefix_length": self.prefix_length, "num_layers": self.num_layers,
                "precision": self.precision, "ablation": self.ablation,
                "method": METHOD if self.ablation == "hide" else RESET_METHOD,
                "intact": {"log_prob": r(self.log_prob), "macro_f1": r(self.f1)},
                "whole_prefix": {"log_prob": r(self.all_log_prob), "macro_f1": r(self.all_f1)},
                "slots": {"log_prob": r(self.slot_log_prob), "macro_f1": r(self.slot_f1)},
                "layers": {"log_prob": r(self.layer_log_prob), "macro_f1": r(self.layer_f1)}}

    @classmethod
    def from_json(cls, d: dict) -> Knockout:
        def a(x):
            return None if x is None else np.asarray(x, dtype=float)

        return cls(d["rows"], d["prefix_length"], d["num_layers"], d["intact"]["log_prob"],
                   d["intact"]["macro_f1"], a(d["slots"]["log_prob"]), a(d["slots"]["macro_f1"]),
                   a(d["layers"]["log_prob"]), a(d["layers"]["macro_f1"]),
                   d["whole_prefix"]["log_prob"], d["whole_prefix"]["macro_f1"],
                   d.get("precision", "float32"), d.get("ablation", "hide"))


METHOD = (
    "Knockout: a part of the prefix is hidden by masking it out of attention (exact: the "
    "softmax runs over the other keys as if it had never been cached; positions stay), then "
    "the held-out rows are scored again. A slot knockout hides one virtual token at every "
    "layer; a layer knockout hides every virtual token at one layer. Shown: the change in the "
    "mean log-probability of the correct label (negative: that part helps) and in macro-F1. "
    "Where the processor multiplies bfloat16 natively (a GPU, a CPU with AVX512-BF16 or AMX) "
    "every pass, the intact one included, runs in bfloat16, which is faster; knockout.json "
    "records the precision used, and docs/benchmarks.md how bfloat16's ranking compared with "
    "float32's on the default model."
)

RESET_METHOD = (
    "Reset to start: a part of the prefix is set back to the key/values it started training "
    "from, then the held-out rows are scored again. A slot reset puts one virtual token back "
    "at every layer; a layer reset puts every virtual token back at one layer. Where hiding "
    "measures what a part does, resetting measures what training added to it: a part that "
    "only keeps doing what its start text did costs nothing when reset."
)


def knockout(loaded: LoadedModel, kv: torch.Tensor, score: Score, gold: Sequence[int] | None,
             progress: Callable[[float, str], None] | None = None, *,
             replay: bool = False, dtype: torch.dtype | None = None,
             streams: int = 1) -> Knockout:
    """Score intact, then with each slot hidden (all layers), each layer hidden (all slots),
    and the whole prefix hidden. `score(model)` scores the held-out rows (N, K) with `kv` on
    the given model; gold (N,) label indices, or None when K == 1 (a target's log-likelihood).

    replay=True: the layer knockouts start at their layer from the intact pass's layer
    outputs (Replay), ~(L+1)/2 layers each instead of L: a third less work for the default
    model. Only for a `score` that reads each row in one forward call, in a fixed order.
    dtype: what every pass runs in (None: the model's own); a float32 kv is cast on use.
    streams > 1: after the intact pass, the knocked-out passes run `streams` at a time, each
    on its own twin with one CPU thread (see knockout_streams).
    """
    _check_kv(loaded, kv)
    L, P = kv.shape[0], kv.shape[3]
    gold_a = None if gold is None else np.asarray(gold, dtype=np.int64)
    variants: list[dict[int, list[int]]] = [{}]
    variants += [{layer: [p] for layer in range(L)} for p in range(P)]
    variants += [{layer: list(range(P))} for layer in range(L)]
    variants += [{layer: list(range(P)) for layer in range(L)}]
    n = len(variants)
    saved = Replay() if replay else None

    def what(i: int) -> str:
        return ("intact" if i == 0 else f"slot {i - 1}" if i <= P
                else f"layer {i - 1 - P}" if i <= P + L else "whole prefix")

    def begin(i: int) -> int:  # the first layer pass i computes (layers below: replayed)
        return i - 1 - P if P < i <= P + L else 0

    def run(i: int, model_replay: Replay | None, stream: int) -> np.ndarray:
        with knocked_out(loaded, variants[i], model_replay, dtype, stream) as model:
            ll = np.asarray(score(model), dtype=np.float64)
        if gold_a is not None and ll.shape[0] != len(gold_a):
            raise InterpretError(f"the score gave {ll.shape[0]} rows for {len(gold_a)} gold labels")
        return ll

    lls: list[np.ndarray | None] = [None] * n
    if streams <= 1:
        for i in range(n):
            if progress:
                progress(i / n, f"knockout: {what(i)} ({i + 1}/{n})")
            if saved is not None:
                saved.record() if i == 0 else saved.start(begin(i))
            lls[i] = run(i, saved, 0)
    else:
        # The intact pass first, then the other full passes (the whole prefix, the slots)
        # beside it, then layers from the bottom up (shorter and shorter): streams end close
        # together. A layer pass replays the intact pass's record, so it waits for it.
        order = [0, n - 1, *range(1, n - 1)]
        recorded = threading.Event()

        def one(i: int, stream: int) -> np.ndarray:
            if i == 0:
                if saved is not None:
                    saved.record()
                try:
                    return run(0, saved, stream)
                finally:
                    recorded.set()
            if saved is not None and begin(i):
                recorded.wait()
            return run(i, saved.view(begin(i)) if saved is not None else None, stream)

        if progress:
            progress(0.0, f"knockout: {n} passes, {streams} at a time")
        done_lls = _in_streams(order, one, streams, (
            lambda done, i: progress(done / n, f"knockout: {what(i)} done ({done}/{n})"))
            if progress else None)
        for i, ll in zip(order, done_lls, strict=True):
            lls[i] = ll
    if progress:
        progress(1.0, "knockout: done")
    return measured(lls, gold_a, P, L,
                    str(dtype or next(loaded.model.parameters()).dtype).removeprefix("torch."))


def measured(lls: Sequence[np.ndarray], gold: np.ndarray | None, P: int, L: int,
             precision: str, ablation: str = "hide") -> Knockout:
    """A Knockout from the scores (N, K) of its passes, in order: intact, each slot, each
    layer, the whole prefix."""
    results = [_measure(ll, gold) for ll in lls]
    base_lp, base_f1 = results[0]
    lp = np.array([r[0] for r in results]) - base_lp
    f1 = None if base_f1 is None else np.array([r[1] for r in results]) - base_f1
    return Knockout(
        rows=lls[0].shape[0], prefix_length=P, num_layers=L,
        log_prob=base_lp, f1=base_f1, slot_log_prob=lp[1:P + 1],
        slot_f1=None if f1 is None else f1[1:P + 1], layer_log_prob=lp[P + 1:P + 1 + L],
        layer_f1=None if f1 is None else f1[P + 1:P + 1 + L], all_log_prob=float(lp[-1]),
        all_f1=None if f1 is None else float(f1[-1]), precision=precision, ablation=ablation)


def _in_streams(items: Sequence[int], run: Callable[[int, int], np.ndarray], streams: int,
                done: Callable[[int, int], None] | None) -> list[np.ndarray]:
    """run(item, stream) for every item, `streams` at a time, each worker thread on one CPU
    thread and its own stream number; results in item order. done(count, item) is called
    from this thread as each finishes. Items are handed out in order: give the long ones
    first."""
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for stream in range(streams):
        free.put(stream)

    def task(item: int) -> np.ndarray:
        stream = free.get()
        try:
            with one_thread_here(), torch.inference_mode():
                return run(item, stream)
        finally:
            free.put(stream)

    results: dict[int, np.ndarray] = {}
    with ThreadPoolExecutor(streams, thread_name_prefix="knockout") as pool:
        futures = {pool.submit(task, item): item for item in items}
        try:
            for count, future in enumerate(as_completed(futures), 1):
                results[futures[future]] = future.result()
                if done:
                    done(count, futures[future])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [results[item] for item in items]


def knockout_streams(device: torch.device) -> int:
    """How many knockout passes to run at once: on CPU one more than the threads torch would
    use (at most 8), each pass on a single thread. Passes in parallel need no barrier between
    threads at every matrix product, and the extra pass takes up a core another one leaves
    idle while it waits for it. On a GPU: 1."""
    return 1 if device.type != "cpu" else max(1, min(torch.get_num_threads() + 1, 8))


@torch.inference_mode()
def target_log_likelihoods(model: torch.nn.Module, kv: torch.Tensor, encoder, inputs:
                           Sequence[str], targets: Sequence[str],
                           batch_size: int = 16) -> np.ndarray:
    """A generation run's score: mean log-probability per target token (EOS included), one
    row per (input, target) pair: (N, 1). encoder: the run's encode.PairEncoder."""
    from prefixlab.engine.encode import collate
    from prefixlab.engine.prefix import forward

    examples = encoder.examples(list(inputs), list(targets))
    pad = encoder.tokenizer.pad_token_id
    device = next(model.parameters()).device
    out = np.zeros((len(examples), 1))
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad).to(device)
        logits = forward(model, kv.to(device), batch.input_ids, batch.attention_mask,
                         batch.loss_mask)  # (n_target_tokens, V), rows in order
        logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.targets[:, None])[:, 0]
        counts = batch.loss_mask.sum(1).tolist()  # target tokens per row
        for i, part in enumerate(logp.split(counts)):
            out[start + i, 0] = float(part.mean())
    return out


@dataclass
class LabelPush:
    """Per layer, how much the prefix's values favour each label (value readout on labels)."""

    labels: list[str]
    push: np.ndarray  # (L, K): mean over slots of the label's first-token logit, centered per layer


def label_push(loaded: LoadedModel, kv: torch.Tensor, labels: Sequence[str],
               label_ids: Sequence[Sequence[int]]) -> LabelPush:
    """The value readout restricted to the label words: which label each layer's values push.

    Each label is read by its first token (the one scoring sees first); logits are averaged
    over the prefix slots and centered across labels, so a layer that pushes no label in
    particular reads 0 everywhere.
    """
    if len(labels) != len(label_ids) or not labels:
        raise InterpretError("give one token list per label")
    logits = value_logits(loaded, kv)  # (L, P, V)
    first = torch.tensor([ids[0] for ids in label_ids])
    per_label = logits[..., first].mean(1)  # (L, K)
    return LabelPush(list(labels), (per_label - per_label.mean(-1, keepdim=True)).numpy())


__all__ = ["METHOD", "RESET_METHOD", "Knockout", "LabelPush", "Replay", "knockout",
           "knockout_streams", "knocked_out", "label_push", "measured", "target_log_likelihoods"]
