"""A transformers causal LM as a teacher: batched sampling that records what each exposure shows."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from distillscope import toolcalls
from distillscope.errors import TeacherError
from distillscope.exposure import Full, Signal, Text, TopK, tail_mass
from distillscope.teachers.base import (
    BatchRow,
    Completion,
    OnStep,
    SamplingConfig,
    StopRow,
    row_seed,
)
from distillscope.tokens import encode_prompt


def pick_device(device: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TeacherError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise TeacherError(f"device {device!r} asked for, but no CUDA device is available")
    return chosen


class _SampleAndRecord(LogitsProcessor):
    """Draws each row's next token from its own seeded generator and records the raw logprobs.

    Placed as the only logits processor of a greedy ``generate`` call: it receives the raw logits,
    picks the token by the Gumbel-max trick (argmax of logp/T + Gumbel noise is an exact sample
    from softmax(logits/T)), and returns a one-hot mask so greedy decoding keeps that choice. The
    noise comes from per-row generators seeded by the prompt, so the draw does not depend on which
    other prompts share the batch. Each row has its own temperature, length limit, processors,
    ``logit_bias`` and ``on_step``; ``done`` says which rows have finished (``_RowsDone`` hands
    it to ``generate``, so a batch stops when its last row does).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        temperature: float | Sequence[float],
        k: int,
        keep_full: bool,
        processors: Sequence[LogitsProcessor] = (),
        on_step: OnStep | None = None,
        prefixes: Sequence[Sequence[Sequence[int]] | None] | None = None,
        *,
        row_processors: Sequence[Sequence[LogitsProcessor]] | None = None,
        on_steps: Sequence[OnStep | None] | None = None,
        biases: Sequence[Mapping[int, float] | None] | None = None,
        limits: Sequence[int] | None = None,
        stop_ids: Sequence[int] = (),
    ):
        rows = len(seeds)
        self.processors = list(processors)
        self.groups = _processor_groups(row_processors or [()] * rows)
        #: per row, token sequences the answer must begin with one of (constrained decoding)
        self.prefixes = prefixes
        self.on_steps = list(on_steps) if on_steps is not None else [on_step] + [None] * (rows - 1)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        if isinstance(temperature, int | float):
            temperature = [temperature] * rows
        self.temperatures = torch.tensor(list(temperature), dtype=torch.float32)
        self.biases = biases if biases is not None and any(biases) else None
        self._bias: torch.Tensor | None = None
        self.limits = list(limits) if limits is not None else [1 << 62] * rows
        self.stop_ids = {int(i) for i in stop_ids}
        self.done = torch.zeros(rows, dtype=torch.bool)
        self.k = k
        self.keep_full = keep_full
        self.chosen: list[torch.Tensor] = []
        self.chosen_logprobs: list[torch.Tensor] = []
        self.topk_ids: list[torch.Tensor] = []
        self.topk_logprobs: list[torch.Tensor] = []
        self.full: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for processor in self.processors:
            scores = processor(input_ids, scores)
        scores = self._per_row(input_ids, scores)
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        target = logprobs if self.biases is None else logprobs + self._bias_for(logprobs)
        draw = target
        hot = (self.temperatures > 0).tolist()
        if any(hot):
            vocab = logprobs.shape[-1]
            rows = [r for r, is_hot in enumerate(hot) if is_hot]
            uniform = torch.stack([torch.rand(vocab, generator=self.generators[r]) for r in rows])
            gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-30))).to(logprobs.device)
            scaled = target[rows] / self.temperatures[rows, None].to(logprobs.device) + gumbel
            draw = (
                scaled
                if len(rows) == len(hot)
                else target.clone().index_copy_(
                    0, torch.tensor(rows, device=logprobs.device), scaled
                )
            )
        choice = draw.argmax(dim=-1)
        if self.prefixes is not None:
            choice = self._constrain(choice, draw)
        self.chosen.append(choice.cpu())
        self.chosen_logprobs.append(logprobs.gather(-1, choice[:, None])[:, 0].cpu())
        if self.k:
            values, ids = torch.topk(logprobs, self.k, dim=-1, sorted=True)
            self.topk_ids.append(ids.cpu())
            self.topk_logprobs.append(values.cpu())
        if self.keep_full:
            self.full.append(logprobs.cpu())
        self._advance()
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(-1, choice[:, None], 0.0)
        return forced

    def _per_row(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Each row's own processors (a per-account watermark), one call per group of rows that
        share the same ones; on all rows at once when every row shares them."""
        if len(self.groups) == 1 and len(self.groups[0][1]) == len(scores):
            for processor in self.groups[0][0]:
                scores = processor(input_ids, scores)
            return scores
        if self.groups:
            scores = scores.clone()
        for processors, rows in self.groups:
            index = torch.tensor(rows, device=scores.device)
            part_ids, part = input_ids[index], scores[index]
            for processor in processors:
                part = processor(part_ids, part)
            scores[index] = part
        return scores

    def _bias_for(self, logprobs: torch.Tensor) -> torch.Tensor:
        if self._bias is None:
            bias = torch.zeros(logprobs.shape, dtype=logprobs.dtype)
            for row, mapping in enumerate(self.biases):
                for token, value in (mapping or {}).items():
                    bias[row, int(token)] = float(value)
            self._bias = bias.to(logprobs.device)
        return self._bias

    def _advance(self) -> None:
        """Hand each unfinished row's token to its ``on_step``; mark rows that stop, reach their
        limit, or whose callback raised ``StopRow``."""
        step = len(self.chosen) - 1
        chosen, logprob = self.chosen[-1], self.chosen_logprobs[-1]
        for row, callback in enumerate(self.on_steps):
            if self.done[row]:
                continue
            token = int(chosen[row])
            if callback is not None:
                try:
                    callback(
                        token,
                        float(logprob[row]),
                        self.topk_ids[-1][row].numpy() if self.k else None,
                        self.topk_logprobs[-1][row].numpy() if self.k else None,
                    )
                except StopRow:
                    self.done[row] = True
                    self.on_steps[row] = None
                    continue
            if token in self.stop_ids or step + 1 >= self.limits[row]:
                self.done[row] = True

    def _constrain(self, choice: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
        """Rows still inside a forced prefix take the likeliest of the tokens that continue one
        of their alternatives under the same draw (an exact sample from the teacher's
        distribution restricted to them); the logprobs reported stay the teacher's own."""
        step = len(self.chosen)
        drawn = [[int(t[row]) for t in self.chosen] for row in range(len(choice))]
        for row, alternatives in enumerate(self.prefixes):
            if not alternatives:
                continue
            alive = [a for a in alternatives if list(a[:step]) == drawn[row]]
            if not alive or any(len(a) <= step for a in alive):
                continue  # the prefix is complete (or was left): free from here
            allowed = sorted({int(a[step]) for a in alive})
            if int(choice[row]) not in allowed:
                choice[row] = allowed[int(draw[row, allowed].argmax())]
        return choice


def _processor_groups(
    row_processors: Sequence[Sequence[LogitsProcessor]],
) -> list[tuple[Sequence[LogitsProcessor], list[int]]]:
    groups: dict[tuple[int, ...], tuple[Sequence[LogitsProcessor], list[int]]] = {}
    for row, processors in enumerate(row_processors):
        if processors:
            key = tuple(id(p) for p in processors)
            groups.setdefault(key, (processors, []))[1].append(row)
    return list(groups.values())


class _RowsDone(StoppingCriteria):
    """Tells ``generate`` which rows the recorder has finished (per-row lengths, ``StopRow``)."""

    def __init__(self, recorder: _SampleAndRecord):
        self.recorder = recorder

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return self.recorder.done.to(input_ids.device).clone()


class TransformersTeacher:
    """Any local transformers causal LM, on CPU or CUDA, at any exposure up to ``full``."""

    max_exposure = Full()
    logprobs_kind = "raw"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        id: str,
        batch_size: int = 16,
        processors: Sequence[LogitsProcessor] = (),
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.id = id
        self.batch_size = batch_size
        #: Applied to every generation before the draw (a watermark, a defence), before any
        #: processors a single call adds.
        self.processors = list(processors)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._stop_ids = self._find_stop_ids()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | None = "auto", id: str | None = None, **kwargs
    ) -> TransformersTeacher:
        """Load a local transformers directory (never a hub download)."""
        torch_device = pick_device(device)
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise TeacherError(f"{path} is not a transformers model directory (no config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=torch.float32
            ).to(torch_device)
        except (OSError, ValueError) as exc:
            raise TeacherError(f"cannot load a causal LM from {path}: {exc}") from exc
        return cls(model, tokenizer, id=id or f"hf:{path.resolve()}", **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _find_stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
        return sorted(i for i in ids if i is not None)

    def encode_prompt(self, prompt: str, max_prompt_tokens: int) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, max_prompt_tokens)

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Completion]:
        out: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(prompts[start : start + self.batch_size], sampling))
        return out

    def _generate_batch(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Completion]:
        encoded = [self.encode_prompt(p, sampling.max_prompt_tokens) for p in prompts]
        return self.generate_from_ids(encoded, sampling, keys=prompts)

    def generate_from_ids(
        self,
        encoded: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        *,
        keys: Sequence[str],
        processors: Sequence[LogitsProcessor] = (),
        on_step: OnStep | None = None,
        prefixes: Sequence[Sequence[Sequence[int]] | None] | None = None,
    ) -> list[Completion]:
        """Sample from exact prompt ids (already templated). ``keys`` seed each row's draw.

        ``processors`` (a watermark, say) transform the raw logits before the draw, so the
        reported logprobs are those of the distribution actually sampled; ``on_step`` sees each
        token of the first row as it is drawn; ``prefixes`` gives each row token sequences its
        answer must begin with one of (``toolcalls.forced_prefixes``), or ``None``.
        """
        rows = [
            BatchRow(
                ids,
                key,
                sampling,
                processors=processors,
                on_step=on_step if row == 0 else None,
                prefixes=None if prefixes is None else prefixes[row],
            )
            for row, (ids, key) in enumerate(zip(encoded, keys, strict=True))
        ]
        return self.generate_rows(rows)

    @torch.inference_mode()
    def generate_rows(self, rows: Sequence[BatchRow]) -> list[Completion]:
        """One batch of generations, each with its own sampling, processors, prefixes,
        ``logit_bias`` and ``on_step``: the forward passes are shared, the draws are not (each
        row's equals what it draws alone, up to float rounding of the padded batch)."""
        encoded = [list(row.ids) for row in rows]
        vocab = self.model.get_output_embeddings().weight.shape[0]
        for row in rows:
            bad = [t for t in (row.logit_bias or {}) if not 0 <= int(t) < vocab]
            if bad:
                raise TeacherError(f"logit_bias names token {bad[0]}, outside the vocabulary")
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        exposures = [row.sampling.exposure for row in rows]
        ks = [e.k if isinstance(e, TopK) else 0 for e in exposures]
        limits = [row.sampling.max_new_tokens for row in rows]
        recorder = _SampleAndRecord(
            [row_seed(row.sampling.seed, row.key) for row in rows],
            [row.sampling.temperature for row in rows],
            max(ks),
            keep_full=any(isinstance(e, Full) for e in exposures),
            processors=self.processors,
            prefixes=[row.prefixes for row in rows] if any(r.prefixes for r in rows) else None,
            row_processors=[row.processors for row in rows],
            on_steps=[row.on_step for row in rows],
            biases=[row.logit_bias for row in rows],
            limits=limits,
            stop_ids=self._stop_ids,
        )
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max(limits),
            eos_token_id=self._stop_ids,
            pad_token_id=pad,
        )
        prefilled = self._prefilled(encoded, width)
        self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
            stopping_criteria=StoppingCriteriaList([_RowsDone(recorder)]),
            **({} if prefilled is None else {"cache": prefilled}),
        )
        chosen = torch.stack(recorder.chosen, dim=1).numpy()
        chosen_lp = torch.stack(recorder.chosen_logprobs, dim=1).numpy()
        completions = []
        for i, row in enumerate(rows):
            exposure, k = exposures[i], ks[i]
            length, finish = self._completion_length(chosen[i, : limits[i]])
            ids = chosen[i, :length].astype(np.int64)
            signal = Signal(exposure, ids)
            if not isinstance(exposure, Text):
                signal.token_logprobs = chosen_lp[i, :length].astype(np.float32)
            if isinstance(exposure, TopK):
                steps = recorder.topk_ids[:length]
                signal.topk_ids = torch.stack([t[i, :k] for t in steps]).numpy()
                signal.topk_logprobs = torch.stack(
                    [t[i, :k] for t in recorder.topk_logprobs[:length]]
                ).numpy()
                signal.tail_mass = tail_mass(signal.topk_logprobs)
            if isinstance(exposure, Full):
                signal.full_logprobs = torch.stack([t[i] for t in recorder.full[:length]]).numpy()
            completions.append(
                Completion(
                    prompt=row.key,
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    signal=signal,
                    finish_reason=finish,
                    prompt_ids=np.asarray(encoded[i], dtype=np.int64),
                    prompt_tokens=len(encoded[i]),
                )
            )
        return completions

    def _prefilled(self, encoded: list[list[int]], width: int):
        """A cache of every prompt but its last token, each prefilled on its own and left-padded
        into one batch: a padded prefill computes its padding like any token (compute-bound on a
        CPU), one row at a time computes only real tokens. ``None`` (prefill the padded batch)
        for a single row, prompts of equal length, or a model whose cache cannot be built so."""
        lengths = [len(ids) for ids in encoded]
        if len(encoded) < 2 or min(lengths) == max(lengths) or min(lengths) < 2:
            return None
        try:
            from transformers import DynamicCache

            layers = []
            for ids in encoded:
                out = self.model(input_ids=torch.tensor([ids[:-1]], device=self.device))
                cache = out.cache if getattr(out, "cache", None) is not None else out[1]
                layers.append([(layer.keys, layer.values) for layer in cache.layers])
            data = []
            for index in range(len(layers[0])):
                keys, values = [], []
                for ids, row in zip(encoded, layers, strict=True):
                    key, value = row[index]
                    pad = (0, 0, width - len(ids), 0)
                    keys.append(torch.nn.functional.pad(key, pad))
                    values.append(torch.nn.functional.pad(value, pad))
                data.append((torch.cat(keys), torch.cat(values)))
            return DynamicCache(data, config=self.model.config)
        except (AttributeError, TypeError, ValueError, RuntimeError):
            return None  # not a plain decoder cache: the padded prefill is always right

    def chat(
        self,
        messages: Sequence[dict],
        sampling: SamplingConfig,
        *,
        tools: Sequence[dict] | None = None,
        tool_choice="auto",
        key: str | None = None,
        processors: Sequence[LogitsProcessor] = (),
        on_step: OnStep | None = None,
    ) -> Completion:
        """One assistant turn of a conversation in OpenAI's shape, tools in the convention of
        ``distillscope.toolcalls``; the answer's ``tool_calls`` are parsed from its text. ``key``
        seeds the draw (default: the conversation itself)."""
        encoded = toolcalls.render_chat_ids(self.tokenizer, messages, tools, tool_choice)
        forced = toolcalls.forced_prefixes(self.tokenizer, tools, tool_choice)
        if key is None:
            key = json.dumps([messages, tools, tool_choice], ensure_ascii=False, sort_keys=True)
        completion = self.generate_from_ids(
            [encoded],
            sampling,
            keys=[key],
            processors=processors,
            on_step=on_step,
            prefixes=None if forced is None else [forced],
        )[0]
        if tools and tool_choice != "none":
            completion.tool_calls = toolcalls.parse_tool_calls(
                completion.text, toolcalls.tool_names(tools), ids_from=key
            )
        if completion.tool_calls:
            completion.finish_reason = "tool_calls"
        return completion

    def _completion_length(self, row: np.ndarray) -> tuple[int, str]:
        """Tokens up to and including the first stop token (kept: students should learn to stop)."""
        stops = np.flatnonzero(np.isin(row, self._stop_ids))
        if len(stops):
            return int(stops[0]) + 1, "stop"
        return len(row), "length"

    @torch.inference_mode()
    def score(
        self, prompt_ids: Sequence[np.ndarray], completion_ids: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """Raw logprobs (T, V) that predict each completion token, from one padded forward pass."""
        rows = [np.concatenate([p, c]).astype(np.int64) for p, c in zip(prompt_ids, completion_ids)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)
        ).logits
        out = []
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            start = len(p) - 1
            out.append(
                torch.log_softmax(logits[i, start : start + len(c)].float(), -1).cpu().numpy()
            )
        return out

    def close(self) -> None:
        self.model = None
