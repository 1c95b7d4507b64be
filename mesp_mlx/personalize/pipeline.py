"""The personalization pipeline (docs/design.md §6): stream -> selection buffer -> sparse annotation -> self-synthesis ->
budgeted MeSP fine-tune -> (with the user's preference pairs) a DPO pass from the fine-tune's adapter -> ROUGE-1 on
held-out dialogues and preference accuracy on held-out pairs, before and after each pass.

Everything stays on the machine. Outputs in `out/`: buffer.jsonl (the kept dialogues with their scores),
synthetic.jsonl (paraphrases and the item each came from), data/train.jsonl (what was trained on, mlx-lm chat format),
adapters/ (mlx-lm adapters, metrics), evaluation.jsonl (held-out prompts, references and replies) and report.json;
with --preference-pairs also preference/train.jsonl and preference/heldout.jsonl (the split pairs), adapters_dpo/
(the DPO pass's adapters) and preference_evaluation.jsonl (each held-out pair's log-probability margins).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import dequantize_model

from .. import backend
from ..adapters.lora import apply_lora, cast_lora, load_adapter_weights
from ..data.datasets import DataError, chat_record
from ..data.preference import load_pairs
from ..io import atomic_write_json, write_jsonl
from ..lock import FolderLock
from ..models import cast_float_params, load_model, set_compute_path
from ..run.config import ConfigError, TrainConfig
from ..run.prepare import check_fits
from ..run.train import train
from .annotate import annotate, file_annotator, interactive_annotator
from .buffer import POLICIES, Candidate, SelectionBuffer, make_policy
from .generation import TextEncoder, generate_batch, paraphrase_all
from .preference import held_out_indices, preference_accuracy, read_pair_rows
from .scores import dominant_domain, dss, eoe, load_lexicons, rouge1, words
from .stream import Dialogue, read_dialogues

# ranges past which a value is a typo, not a wish (a buffer of a TB, 100 paraphrases per prompt, a reply of 8192 tokens):
# refused before anything runs, as a stuck or crashing pipeline otherwise (also for `federate`'s devices)
MAX_BUFFER_KB, MAX_VARIANTS, MAX_EVAL_TOKENS = 1e9, 100, 8192

# the fine-tune's defaults; any TrainConfig key can be given in PersonalizeConfig.train
TRAIN_DEFAULTS = {"method": "mesp", "iters": 100, "batch_size": 4, "learning_rate": 2e-4, "optimizer": "adamw",
                  "mask_prompt": True, "max_seq_length": 256, "device_profile": "iphone-17-pro",
                  "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0,
                                      "keys": ["q", "k", "v", "o", "gate", "up", "down"]},
                  "save_every": 0, "steps_per_report": 10}
SCORE_LENGTH = 2048  # preference accuracy's token limit when no max_seq_length is set (mlx-lm's default)


@dataclass
class PersonalizeConfig:
    stream: str  # the user's dialogues, jsonl (stream.py)
    out: str = "runs/personalize"
    model: str | None = None  # as for train; None = the embedded SmolLM2
    eval: str | None = None  # held-out dialogues of the same user (with responses)
    buffer_kb: float = 64.0
    policy: str = "quality"  # quality | random | fifo | kcenter
    lexicons: str | None = None  # folder of <domain>.txt files; default: the shipped ones
    seed: int = 0
    annotate_k: int = 0  # ask the user about at most k kept dialogues
    annotations: str | None = None  # non-interactive answers: jsonl {"prompt", "response"}
    interactive: bool | None = None  # None: ask on the terminal when stdin is one and no file is given
    variants: int = 3  # paraphrases per kept prompt
    synth_min_rouge: float = 0.3
    synth_temperature: float = 0.8
    eval_max_tokens: int = 48
    preference_pairs: str | None = None  # jsonl {"prompt", "chosen", "rejected"}: a DPO pass after the fine-tune
    dpo_iters: int | None = None  # None: half the fine-tune's iterations (at least 1)
    dpo_beta: float = 0.1
    preference_heldout: float = 0.2  # share of the pairs held out for preference accuracy (at least one pair)
    train: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy {self.policy!r}: one of {', '.join(POLICIES)}")
        if self.buffer_kb <= 0:
            raise ConfigError(f"--buffer-kb must be positive, not {self.buffer_kb}")
        if not 1 / 1024 <= self.buffer_kb <= MAX_BUFFER_KB:  # NaN fails too
            raise ConfigError(f"--buffer-kb must be in [1/1024, {MAX_BUFFER_KB:g}] (a byte to a TB), not {self.buffer_kb}")
        if self.annotate_k < 0 or self.variants < 0:
            raise ConfigError("--annotate-k and --variants must be >= 0")
        if self.variants > MAX_VARIANTS:
            raise ConfigError(f"--variants must be at most {MAX_VARIANTS}, not {self.variants}")
        if not 0 <= self.synth_min_rouge <= 1:
            raise ConfigError(f"--synth-min-rouge must be in [0, 1], not {self.synth_min_rouge}")
        if not (math.isfinite(self.synth_temperature) and self.synth_temperature >= 0):
            raise ConfigError(f"--synth-temperature must be a finite number >= 0, not {self.synth_temperature}")
        if not 1 <= self.eval_max_tokens <= MAX_EVAL_TOKENS:
            raise ConfigError(f"--eval-max-tokens must be in [1, {MAX_EVAL_TOKENS}], not {self.eval_max_tokens}")
        self.validate_preference()

    def validate_preference(self) -> None:
        if self.dpo_iters is not None and self.dpo_iters < 1:
            raise ConfigError(f"--dpo-iters must be >= 1, not {self.dpo_iters}")
        if not (math.isfinite(self.dpo_beta) and self.dpo_beta > 0):
            raise ConfigError(f"--dpo-beta must be a finite number > 0, not {self.dpo_beta}")
        if not 0 < self.preference_heldout < 1:  # NaN fails too
            raise ConfigError(f"--preference-heldout must be in (0, 1), not {self.preference_heldout}")


def load_for_inference(model_spec: str | None):
    """The model as the pipeline's own stages use it (embeddings, replies, paraphrases). Per backend: on Metal the
    4-bit weights stay and the fused quantized matmul runs; on CPU the weights are dequantized once to fp32 (decoding
    re-dequantizes every weight per token otherwise: 2.7 vs 15.6 tokens/s on SmolLM2 here)."""

    loaded = load_model(model_spec, lazy=False)
    if backend.compute_path("auto") == "fused":
        set_compute_path(loaded.model, "fused")
        cast_float_params(loaded.model, backend.default_dtype())
    else:
        loaded.model = dequantize_model(loaded.model)
        cast_float_params(loaded.model, "float32")
    mx.eval(loaded.model.parameters())
    return loaded


def make_candidates(dialogues: list[Dialogue], encoder: TextEncoder, lexicons: dict) -> list[Candidate]:
    """Score what does not depend on the buffer (EOE, DSS, domain, embedding) once per dialogue. The scored text is
    the dialogue as the user saw it: prompt and response."""
    texts = [d.prompt if d.response is None else f"{d.prompt}\n{d.response}" for d in dialogues]
    ids = [encoder.tokens(t) for t in texts]
    embeddings = encoder.embed_many(ids)
    out = []
    for i, (d, text) in enumerate(zip(dialogues, texts)):
        ws = words(text)
        out.append(Candidate(index=i, prompt=d.prompt, response=d.response, domain=dominant_domain(ws, lexicons),
                             embedding=embeddings[i], eoe=eoe(ids[i]), dss=dss(ws, lexicons), source=d.source))
    return out


def select(candidates: list[Candidate], policy: str, capacity_bytes: int, seed: int = 0) -> SelectionBuffer:
    buffer = SelectionBuffer(capacity_bytes, make_policy(policy, seed))
    for c in candidates:
        buffer.offer(dataclasses.replace(c))  # a copy: the buffer sets its IDD, annotation its response
    return buffer


def synthesize(items: list[Candidate], model, tokenizer, variants: int, seed: int, min_rouge: float,
               temperature: float) -> list[dict]:
    """The model's paraphrases of each kept prompt, paired with the kept (or annotated) response."""
    written = paraphrase_all(model, tokenizer, [c.prompt for c in items], variants, seed, min_rouge, temperature)
    return [{"origin": item.index, "prompt": text, "response": item.response,
             "rouge1_to_origin": round(rouge1(text, item.prompt), 4)}
            for item, texts in zip(items, written) for text in texts]


def evaluate(model, tokenizer, dialogues: list[Dialogue], max_tokens: int) -> dict:
    """ROUGE-1 of the model's greedy replies against the user's responses."""
    replies = generate_batch(model, tokenizer, [d.prompt for d in dialogues], max_tokens)
    rows = [{"prompt": d.prompt, "reference": d.response, "reply": r, "rouge1": rouge1(r, d.response)}
            for d, r in zip(dialogues, replies)]
    mean = sum(r["rouge1"] for r in rows) / len(rows)
    return {"rouge1": mean, "rows": rows}


def training_config(cfg: PersonalizeConfig, data_dir: Path, adapter_dir: Path) -> TrainConfig:
    values = {**TRAIN_DEFAULTS, **cfg.train}
    values.update(model=cfg.model, data=str(data_dir), adapter_path=str(adapter_dir), seed=cfg.seed)
    if "lora_parameters" in cfg.train:
        values["lora_parameters"] = {**TRAIN_DEFAULTS["lora_parameters"], **cfg.train["lora_parameters"]}
    unknown = set(values) - TrainConfig.keys()
    if unknown:
        raise ConfigError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    return TrainConfig(**values)


def dpo_config(cfg: PersonalizeConfig, sft: TrainConfig, out: Path, n_pairs: int) -> TrainConfig:
    """The DPO pass: the fine-tune's settings, on the `n_pairs` training pairs, starting from the fine-tune's adapter
    (the reference is the base model: the adapters off)."""
    dpo = dataclasses.replace(sft, train_mode="dpo", beta=cfg.dpo_beta, epochs=None,
                              iters=cfg.dpo_iters or max(1, math.ceil(sft.iters / 2)),
                              batch_size=pair_batch_size(sft.batch_size, n_pairs), data=str(out / "preference"),
                              adapter_path=str(out / "adapters_dpo"),
                              resume_adapter_file=str(out / "adapters" / "adapters.safetensors"),
                              resume=False, demo_prompts=[], test=False)
    # how its errors name the settings
    dpo._sources = {"beta": "--dpo-beta", "iters": "--dpo-iters", "train_mode": "--preference-pairs: train mode"}
    return dpo


def pair_batch_size(batch_size: int, n_pairs: int) -> int:
    """The largest batch <= batch_size that divides the pairs: the trainer's batches (mlx-lm-lora's) drop a
    remainder, always the same longest pairs, which a user's few pairs cannot spare."""
    return max(b for b in range(1, min(batch_size, n_pairs) + 1) if n_pairs % b == 0)


def check_pass(train_cfg: TrainConfig, log) -> None:
    """Validate a pass's settings and, unless --skip-plan, refuse now a pass that cannot fit its budget (before the
    slow stages); the pass then skips its own check."""
    train_cfg.validate()
    if train_cfg.skip_plan:
        return
    if train_cfg.train_mode == "sft":
        check_fits(train_cfg, log)
    else:  # B pairs are 2B rows, as the trainer plans them; the adapter it starts from is not written yet
        log(f"[personalize] the DPO pass: {train_cfg.batch_size} pairs a step = {2 * train_cfg.batch_size} rows")
        check_fits(dataclasses.replace(train_cfg, batch_size=2 * train_cfg.batch_size, resume_adapter_file=None), log)
    train_cfg.skip_plan = True


def with_adapters(loaded, train_cfg, adapter_file: Path):
    """The inference model with the trained LoRA applied (mlx-lm's layers and file)."""

    apply_lora(loaded.model, train_cfg.num_layers, train_cfg.lora_parameters, dora=train_cfg.fine_tune_type == "dora")
    cast_lora(loaded.model, mx.float32)
    load_adapter_weights(loaded.model, adapter_file)
    mx.eval(loaded.model.parameters())
    return loaded.model


def measure(model, tokenizer, cfg: PersonalizeConfig, held_out: list[Dialogue], pairs: list, max_len: int,
            stage: str, log) -> dict:
    """{"rouge": evaluate() on the held-out dialogues, "pairs": preference_accuracy() on the held-out pairs} of one
    model (None for what is not given)."""
    out: dict = {"rouge": None, "pairs": None}
    if held_out:
        t = time.perf_counter()
        out["rouge"] = evaluate(model, tokenizer, held_out, cfg.eval_max_tokens)
        log(f"[personalize] held-out ROUGE-1 {stage}: {out['rouge']['rouge1']:.4f} ({time.perf_counter() - t:.0f} s)")
    if pairs:
        out["pairs"] = preference_accuracy(model, pairs, max_len)
        log(f"[personalize] held-out preference accuracy {stage}: {out['pairs']['accuracy']:.3f} "
            f"({len(pairs)} pairs)")
    return out


def measure_adapter(cfg: PersonalizeConfig, train_cfg: TrainConfig, held_out: list[Dialogue], pairs: list,
                    stage: str, log) -> dict:
    """measure() of the model with a pass's adapters; the model is released afterwards."""
    loaded = load_for_inference(cfg.model)
    model = with_adapters(loaded, train_cfg, Path(train_cfg.adapter_path) / "adapters.safetensors")
    result = measure(model, loaded.tokenizer, cfg, held_out, pairs, score_length(train_cfg), stage, log)
    del model, loaded
    release()
    return result


def score_length(train_cfg: TrainConfig) -> int:
    return train_cfg.max_seq_length or SCORE_LENGTH


def release() -> None:
    """Give the inference model's memory back: a pass's budget is the pass's alone."""
    gc.collect()
    mx.clear_cache()


def pass_summary(result, train_cfg: TrainConfig) -> dict:
    peaks = [r["peak_mb"] for r in result.records]
    return {"status": result.status, "steps": len(result.records), "peak_mb": max(peaks) if peaks else None,
            "budget": train_cfg.device_profile, "final_loss": result.records[-1]["loss"] if result.records else None}


def figures(measured: dict) -> dict:
    """The report's rouge1_<stage> and preference_accuracy_<stage>; `after` is the last pass measured."""
    out = {}
    stages = list(measured)
    if len(stages) > 1:
        stages.append("after")
        measured = {**measured, "after": measured[stages[-2]]}
    for stage in stages:
        if measured[stage]["rouge"] is not None:
            out[f"rouge1_{stage}"] = measured[stage]["rouge"]["rouge1"]
        if measured[stage]["pairs"] is not None:
            out[f"preference_accuracy_{stage}"] = measured[stage]["pairs"]["accuracy"]
    return out


def write_evaluations(out: Path, measured: dict, pair_rows: list[dict], held_pairs: list[int]) -> None:
    """evaluation.jsonl (the last pass's replies beside the earlier ones) and preference_evaluation.jsonl (each
    held-out pair's chosen - rejected log-probability margin per stage)."""
    stages = [s for s in measured if s != "before"]
    if not stages:
        return
    last, earlier = measured[stages[-1]], ["before"] + stages[:-1]
    if last["rouge"] is not None:
        rows = [{**row, **{f"{key}_{s}": measured[s]["rouge"]["rows"][i][key] for s in earlier
                           for key in ("reply", "rouge1")}} for i, row in enumerate(last["rouge"]["rows"])]
        write_jsonl(out / "evaluation.jsonl", rows)
    if last["pairs"] is not None:
        rows = [{**pair_rows[j], **{f"margin_{s}": measured[s]["pairs"]["margins"][i] for s in measured}}
                for i, j in enumerate(held_pairs)]
        write_jsonl(out / "preference_evaluation.jsonl", rows)


def write_pair_split(folder: Path, pair_rows: list[dict], held_pairs: list[int]) -> None:
    """The DPO pass's data folder: train.jsonl (the pairs it trains on) and heldout.jsonl (those it is measured on;
    not valid.jsonl, which the trainer would read)."""
    held = set(held_pairs)
    write_jsonl(folder / "train.jsonl", [r for i, r in enumerate(pair_rows) if i not in held])
    write_jsonl(folder / "heldout.jsonl", [pair_rows[i] for i in held_pairs])


def _annotator(cfg: PersonalizeConfig, ask, show):
    if cfg.annotations:
        return file_annotator(cfg.annotations), f"file {cfg.annotations}"
    interactive = cfg.interactive if cfg.interactive is not None else sys.stdin.isatty()
    if interactive:
        return interactive_annotator(ask, show), "interactive"
    return None, "none (non-interactive and no --annotations file)"


def run(cfg: PersonalizeConfig, log=print, ask=input, candidates: list[Candidate] | None = None,
        before: dict | None = None) -> dict:
    """The whole pipeline; `candidates` (make_candidates of the same stream) and `before` (evaluate of the base
    model on the same held-out set) may be given when several runs share them (tools/personalize_demo.py)."""

    cfg.validate()
    out = Path(cfg.out)
    with FolderLock(out, log, flag="--out"):  # one writer per output folder (refused: exit 75)
        return _run(cfg, out, log, ask, candidates, before)


def _run(cfg: PersonalizeConfig, out: Path, log, ask, candidates: list[Candidate] | None, before: dict | None
         ) -> dict:
    t0 = time.perf_counter()
    lexicons = load_lexicons(cfg.lexicons)
    stream = read_dialogues(cfg.stream)
    held_out = read_dialogues(cfg.eval, need_response=True) if cfg.eval else []
    pair_rows = read_pair_rows(cfg.preference_pairs) if cfg.preference_pairs else []
    held_pairs = held_out_indices(len(pair_rows), cfg.preference_heldout, cfg.seed) if pair_rows else []
    train_cfg = training_config(cfg, out / "data", out / "adapters")
    dpo_cfg = dpo_config(cfg, train_cfg, out, len(pair_rows) - len(held_pairs)) if pair_rows else None
    for pass_cfg in (train_cfg, dpo_cfg) if dpo_cfg else (train_cfg,):
        check_pass(pass_cfg, log)  # bad settings, or a pass that cannot fit, fail here: before the slow stages
    report: dict = {"config": dataclasses.asdict(cfg), "stream": len(stream), "held_out": len(held_out)}
    if dpo_cfg:
        report["preference"] = {"pairs": len(pair_rows), "train": len(pair_rows) - len(held_pairs),
                                "held_out": len(held_pairs), "beta": dpo_cfg.beta, "iters": dpo_cfg.iters,
                                "batch_size": dpo_cfg.batch_size}

    loaded = load_for_inference(cfg.model)
    # every pair tokenized as the DPO pass will: one that cannot be is refused (file:line) before anything is written
    pairs = load_pairs(cfg.preference_pairs, loaded.tokenizer).pairs if pair_rows else []
    held_tokens = [pairs[i] for i in held_pairs]
    buffer = _selection(cfg, loaded, stream, candidates, lexicons, out, log, report)
    items = _annotated(cfg, buffer.items, ask, log, report)
    _write_training_data(cfg, items, loaded, out, log, report)
    if pair_rows:
        write_pair_split(out / "preference", pair_rows, held_pairs)

    measured = {"before": measure(loaded.model, loaded.tokenizer, cfg, held_out if before is None else [],
                                  held_tokens, score_length(train_cfg), "before", log)}
    if held_out and before is not None:
        measured["before"]["rouge"] = before
    del loaded
    release()
    measured.update(_passes(cfg, train_cfg, dpo_cfg, held_out, held_tokens, log, report))
    report.update(figures(measured))
    write_evaluations(out, measured, pair_rows, held_pairs)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "report.json", report)
    log(f"[personalize] report: {out / 'report.json'}")
    return report


def _selection(cfg: PersonalizeConfig, loaded, stream: list[Dialogue], candidates: list[Candidate] | None,
               lexicons: dict, out: Path, log, report: dict) -> SelectionBuffer:
    """The stream through the buffer; buffer.jsonl written."""
    t = time.perf_counter()
    if candidates is None:
        candidates = make_candidates(stream, TextEncoder(loaded.model, loaded.tokenizer), lexicons)
    elif len(candidates) != len(stream):
        raise ValueError("the given candidates are not those of this stream")
    buffer = select(candidates, cfg.policy, int(cfg.buffer_kb * 1024), cfg.seed)
    report["selection"] = {**buffer.summary(), "seconds": round(time.perf_counter() - t, 2)}
    log(f"[personalize] {len(stream)} dialogues -> buffer of {buffer.capacity / 1024:g} KB ({cfg.policy}): "
        f"{len(buffer.items)} kept, {buffer.used} bytes, {report['selection']['distinct_prompts']} distinct prompts")
    write_jsonl(out / "buffer.jsonl", [c.record() for c in buffer.items])
    return buffer


def _annotated(cfg: PersonalizeConfig, items: list[Candidate], ask, log, report: dict) -> list[Candidate]:
    """The kept items after the user's annotations, those with a response only."""
    annotator, how = _annotator(cfg, ask, log) if cfg.annotate_k else (None, "not asked (--annotate-k 0)")
    changed = annotate(items, cfg.annotate_k, annotator) if annotator else []
    report["annotation"] = {"source": how, "asked": min(cfg.annotate_k, len(items)) if annotator else 0,
                            "changed": len(changed)}
    log(f"[personalize] annotation: {how}; {len(changed)} responses set by the user")
    unanswered = [c for c in items if c.response is None]
    if unanswered:
        log(f"[personalize] {len(unanswered)} kept dialogues have no response and are left out of training "
            f"(annotate them with --annotate-k / --annotations)")
    items = [c for c in items if c.response is not None]
    if not items:
        raise DataError("no kept dialogue has a response to train on (give responses in the stream or annotate)")
    return items


def _write_training_data(cfg: PersonalizeConfig, items: list[Candidate], loaded, out: Path, log, report: dict
                         ) -> None:
    """The model's paraphrases (synthetic.jsonl) and the fine-tune's data (data/train.jsonl)."""
    t = time.perf_counter()
    synthetic = synthesize(items, loaded.model, loaded.tokenizer, cfg.variants, cfg.seed, cfg.synth_min_rouge,
                           cfg.synth_temperature) if cfg.variants else []
    report["synthesis"] = {"variants": cfg.variants, "kept": len(synthetic),
                           "seconds": round(time.perf_counter() - t, 2)}
    log(f"[personalize] synthesis: {len(synthetic)} paraphrases of {len(items)} prompts kept "
        f"({report['synthesis']['seconds']:.0f} s)")
    write_jsonl(out / "synthetic.jsonl", synthetic)
    records = [chat_record(c.prompt, c.response) for c in items] + \
              [chat_record(s["prompt"], s["response"]) for s in synthetic]
    write_jsonl(out / "data" / "train.jsonl", records)
    report["train_examples"] = len(records)


def _passes(cfg: PersonalizeConfig, train_cfg: TrainConfig, dpo_cfg: TrainConfig | None, held_out: list[Dialogue],
            held_tokens: list, log, report: dict) -> dict:
    """The fine-tune, then the DPO pass from its adapter, each measured when done; a pass that ends early stops
    the pipeline there. Returns {stage: measure()}; report gets each pass's summary and the last one's status."""
    measured = {}
    passes = [("train", "after_sft", "the fine-tune", train_cfg)]
    if dpo_cfg is not None:
        passes.append(("dpo", "after_dpo", "the DPO pass", dpo_cfg))
    for key, stage, what, pass_cfg in passes:
        result = train(pass_cfg, log=log)
        report[key] = pass_summary(result, pass_cfg)
        report["status"] = result.status
        if result.status != "done":
            log(f"[personalize] {what} ended early ({result.status}); no after-evaluation")
            break
        if held_out or held_tokens:
            measured[stage] = measure_adapter(cfg, pass_cfg, held_out, held_tokens, f"after {what}", log)
    return measured
