"""Serving traffic: requests that arrive at random with prompts and outputs of varied length.

A workload is a list of requests (arrival time, prompt tokens, output tokens, and optionally
a shared prefix: the id of a prompt head other requests also start with and its length),
read from a trace file or generated from a scenario at a rate:

    arrivals   Poisson (exponential gaps at `rate` per second) or bursty: gamma-distributed
               gaps of the same mean and a coefficient of variation `burst_cv` > 1 (BurstGPT,
               Wang et al. 2024, fits gamma gaps to Azure's conversation traces; the CV is ours)
    lengths    log-normal with a stated median and log-spread, clipped to [1, the context]; where
               prompt + output exceed the model's context the prompt is cut (a client truncates
               its document to leave room for the answer), the output kept

Scenarios (lengths in tokens; where a figure is not from the cited source it says so):

    chat          prompts median 100, outputs median 205, log-spread 1.0: chosen so the means
                  (165 and 338) match ShareGPT as the vLLM paper reports it (mean prompt
                  161, output 338; Kwon et al., SOSP 2023, Fig. 11); the spread is ours
    long-context  long-document QA: prompts median 8,000 (log-spread 0.5), outputs median 64
                  (0.7): an assumption in the range of LongBench's documents (Bai et al. 2023)
    agent         a 2,000-token system prompt shared by every request (prefix id 'system'),
                  then a user turn of median 200 (0.8) tokens; outputs median 150 (0.8);
                  our assumption, the shape of tool-calling agents

    random:P/O    every request P prompt tokens and O output tokens (vLLM's benchmark dataset
                  `random` with --random-input-len P --random-output-len O and no spread): the
                  fixed-length runs engines publish, e.g. `random:1024/128` at rate inf

Trace files: CSV with a header, or JSON lines, with the columns `arrival_s`, `prompt_tokens`,
`output_tokens` and optionally `prefix_id`, `prefix_tokens` (Splitwise's and Azure's public
traces carry the first three, under other names; rename the columns).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from costmodel.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_id: str = ""  # requests with the same id start with the same prefix_tokens tokens
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ConfigError(f"request {self.id}: arrival_s must be a time >= 0 seconds, got {self.arrival_s}")
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"request {self.id}: {name} must be a positive integer, got {value!r}")
        if not 0 <= self.prefix_tokens <= self.prompt_tokens:
            raise ConfigError(f"request {self.id}: prefix_tokens must be within the prompt (0..{self.prompt_tokens}), "
                              f"got {self.prefix_tokens}")
        if self.prefix_tokens and not self.prefix_id:
            raise ConfigError(f"request {self.id}: prefix_tokens needs a prefix_id naming the shared prefix")


@dataclass(frozen=True, slots=True, kw_only=True)
class LengthDist:
    """Log-normal token counts: median exp(mu), log-spread sigma."""

    median: float
    sigma: float

    def __post_init__(self) -> None:
        if not self.median >= 1 or not self.sigma >= 0:
            raise ConfigError(f"a length distribution needs median >= 1 and sigma >= 0, got {self.median}, {self.sigma}")

    def sample(self, rng: np.random.Generator, n: int, limit: int) -> np.ndarray:
        values = np.exp(rng.normal(math.log(self.median), self.sigma, n)) if self.sigma else np.full(n, self.median)
        return np.clip(np.rint(values), 1, limit).astype(int)


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    prompt: LengthDist
    output: LengthDist
    shared_prefix_tokens: int = 0  # a system prompt every request starts with


SCENARIOS = {
    "chat": Scenario(name="chat", prompt=LengthDist(median=100, sigma=1.0), output=LengthDist(median=205, sigma=1.0)),
    "long-context": Scenario(name="long-context", prompt=LengthDist(median=8000, sigma=0.5),
                             output=LengthDist(median=64, sigma=0.7)),
    "agent": Scenario(name="agent", prompt=LengthDist(median=200, sigma=0.8), output=LengthDist(median=150, sigma=0.8),
                      shared_prefix_tokens=2000),
}


RANDOM = "random"  # random:PROMPT/OUTPUT: fixed lengths, as vLLM's benchmark random dataset


def scenario_of(name: str) -> Scenario | None:
    """The scenario a workload name names (a built-in one, or random:P/O), None for a trace
    file."""
    if name in SCENARIOS:
        return SCENARIOS[name]
    if not isinstance(name, str) or not name.startswith(RANDOM + ":"):
        return None
    prompt, slash, output = name[len(RANDOM) + 1:].partition("/")
    if not (slash and prompt.isdigit() and output.isdigit() and int(prompt) >= 1 and int(output) >= 1):
        raise ConfigError(f"workload {name!r}: write random:PROMPT/OUTPUT in tokens, e.g. random:1024/128")
    return Scenario(name=name, prompt=LengthDist(median=int(prompt), sigma=0.0),
                    output=LengthDist(median=int(output), sigma=0.0))


def workload_names() -> str:
    """The scenarios a user may name, for messages."""
    return f"{', '.join(SCENARIOS)}, {RANDOM}:PROMPT/OUTPUT"


def arrivals(rng: np.random.Generator, n: int, rate: float, burst_cv: float = 1.0) -> np.ndarray:
    """`n` arrival times (s) at `rate` per second: Poisson (burst_cv 1) or gamma gaps of
    coefficient of variation burst_cv (shape 1 / cv^2, same mean), scaled so that the n - 1
    gaps span (n - 1) / rate exactly: a sample's own mean rate is the one asked for (a
    300-request Poisson sample drawn at 20/s may come at 17.7/s, and a planner judging a layout
    at 20/s would have loaded it 11% less), its burstiness kept. rate inf: all at 0."""
    if math.isinf(rate):
        return np.zeros(n)
    if not rate > 0:
        raise ConfigError(f"--rate must be requests per second > 0 (or inf: all at once), got {rate}")
    if not burst_cv > 0:
        raise ConfigError(f"--burst-cv must be > 0 (1: Poisson), got {burst_cv}")
    shape = 1.0 / burst_cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), n)  # mean 1 / rate
    times = np.cumsum(gaps) - gaps[0]
    if n > 1 and times[-1] > 0:
        times *= (n - 1) / rate / times[-1]
    return times


def generate(scenario: str | Scenario, *, rate: float, requests: int, context: int, seed: int = 0,
             burst_cv: float = 1.0) -> list[Request]:
    """A workload of `requests` requests of a scenario at `rate` per second; every request's
    prompt + output fits the model's `context`."""
    sc = scenario_of(scenario) if isinstance(scenario, str) else scenario
    if sc is None:
        raise ConfigError(f"unknown workload {scenario!r}; use one of {workload_names()} or a trace file (.csv/.jsonl)")
    if requests < 1:
        raise ConfigError(f"--requests must be a positive integer, got {requests}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--workload-seed must be an integer >= 0, got {seed!r}")
    if sc.shared_prefix_tokens + 2 > context:
        raise ConfigError(f"workload {sc.name}'s {sc.shared_prefix_tokens}-token shared prompt does not fit the "
                          f"model's context of {context}")
    fixed = not sc.prompt.sigma and not sc.output.sigma
    if fixed and sc.prompt.median + sc.output.median + sc.shared_prefix_tokens > context:
        raise ConfigError(f"workload {sc.name}: {sc.prompt.median:g} + {sc.output.median:g} tokens exceed the model's "
                          f"context of {context} (a server refuses such a request); give shorter lengths")
    rng = np.random.default_rng(seed)
    times = arrivals(rng, requests, rate, burst_cv)
    room = context - sc.shared_prefix_tokens
    prompts = sc.prompt.sample(rng, requests, max(1, room - 1))
    outputs = np.minimum(sc.output.sample(rng, requests, context), max(1, room - 1))
    # prompt + output within the context: the prompt is cut (a client truncates the document to
    # leave room for the answer, max_model_len - max_tokens), the output kept
    prompts = np.maximum(1, np.minimum(prompts, room - outputs))
    return [Request(id=i, arrival_s=float(t), prompt_tokens=int(p) + sc.shared_prefix_tokens, output_tokens=int(o),
                    prefix_id="system" if sc.shared_prefix_tokens else "", prefix_tokens=sc.shared_prefix_tokens)
            for i, (t, p, o) in enumerate(zip(times, prompts, outputs))]


def context_note(name: str, requests: list[Request], context: int) -> str | None:
    """A line saying that a scenario's requests were cut to the model's context (their prompts
    cut, as `generate` does), where that halved their mean prompt or output; None otherwise."""
    sc = scenario_of(name)
    if sc is None or not requests:
        return None
    prompt, output = mean_lengths(requests)
    if prompt >= 0.5 * sc.prompt.median and output >= 0.5 * sc.output.median:
        return None
    return (f"workload {name}'s requests are cut to the model's context of {context} tokens: mean prompt "
            f"{prompt:.0f}, output {output:.0f} tokens (the scenario's medians {sc.prompt.median:g} and "
            f"{sc.output.median:g}); a longer-context model or a trace file gives longer ones")


def mean_lengths(requests: list[Request]) -> tuple[float, float]:
    """The mean prompt and output tokens of a workload."""
    return (float(np.mean([r.prompt_tokens for r in requests])), float(np.mean([r.output_tokens for r in requests])))


def typical_request(prompt: float, output: float, context: int) -> tuple[int, int]:
    """Mean lengths as one request of whole tokens, at least one each, within the context
    (what the steady-state serving model prices)."""
    p = max(1, round(prompt))
    return p, max(1, min(round(output), context - p))


FIELDS = ("arrival_s", "prompt_tokens", "output_tokens")


def _row(i: int, row: dict, where: str) -> Request:
    missing = [f for f in FIELDS if row.get(f) in (None, "")]
    if missing:
        raise ConfigError(f"{where}: request {i} has no {', '.join(missing)}; a trace needs the columns "
                          f"{', '.join(FIELDS)} (and optionally prefix_id, prefix_tokens)")
    def number(field: str, kind, default=None):
        value = row.get(field) if default is None else (row.get(field) or default)
        try:
            got = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            got = math.nan
        if not math.isfinite(got) or (kind is int and not got.is_integer()):
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"{where}: request {i}: {field} must be {what}, got {value!r}")
        return kind(got)

    fields = dict(arrival_s=number("arrival_s", float), prompt_tokens=number("prompt_tokens", int),
                  output_tokens=number("output_tokens", int), prefix_tokens=number("prefix_tokens", int, 0))
    try:
        return Request(id=i, prefix_id=str(row.get("prefix_id") or ""), **fields)
    except ConfigError as exc:  # the request's own check names it already
        raise ConfigError(f"{where}: {exc}") from None


def load_trace(path: str | Path) -> list[Request]:
    """Requests from a CSV (header row) or JSON-lines trace, sorted by arrival."""
    p = Path(path)
    where = str(path)
    if not p.is_file():
        raise ConfigError(f"no trace file {where}; give a .csv or .jsonl with {', '.join(FIELDS)}, or a scenario "
                          f"({workload_names()})")
    text = p.read_text()
    if p.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    elif p.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{where}:{n}: not JSON ({exc.msg}); a trace has one JSON object per line") from None
        if any(not isinstance(r, dict) for r in rows):
            raise ConfigError(f"{where}: every line must be a JSON object with {', '.join(FIELDS)}")
    else:
        raise ConfigError(f"trace {where}: use a .csv or .jsonl file")
    if not rows:
        raise ConfigError(f"trace {where} has no requests")
    reqs = sorted((_row(i, r, where) for i, r in enumerate(rows)), key=lambda r: r.arrival_s)
    return reqs


def workload(name: str, *, rate: float | None, requests: int, context: int, seed: int = 0,
             burst_cv: float = 1.0) -> list[Request]:
    """A scenario at a rate, or a trace file (its own arrival times; rate None)."""
    if scenario_of(name) is not None:
        if rate is None:
            raise ConfigError(f"workload {name} needs --rate (requests per second; inf: all at once)")
        return generate(name, rate=rate, requests=requests, context=context, seed=seed, burst_cv=burst_cv)
    reqs = load_trace(name)
    too_long = [r.id for r in reqs if r.prompt_tokens + r.output_tokens > context]
    if too_long:
        raise ConfigError(f"trace {name}: {len(too_long)} request(s) (first: {too_long[0]}) exceed the model's context "
                          f"of {context} tokens; cut them or serve a longer-context model")
    return reqs
