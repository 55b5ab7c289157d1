"""lm-evaluation-harness (`lm_eval`, the optional `.[eval]` extra) on a model qat loaded: a run's
fake-quantized model as exported, an export served by our kernels, or a float model.

`QatLM` is the harness's model interface over our model: log-likelihoods of continuations from
one padded forward pass per batch (the tokenization is the harness's own, `TemplateLM`, as its
Hugging Face backend splits a context from its continuation), rolling log-likelihoods over
disjoint windows, and generation through `qat.serve` (greedy: the lean decode loop of a
Llama-style model), stopped at the task's `until` strings. `run_tasks` hands it to
`lm_eval.simple_evaluate`; a directory of task YAMLs (over local JSON files) works offline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# resamples for the standard errors of metrics without a closed form (accuracy has one)
BOOTSTRAP_ITERS = 1000
INSTALL = "pip install 'qat[eval]'  (lm-evaluation-harness, pinned to the tested range)"


def require_lm_eval():
    """The lm_eval module, or ImportError saying how to install it."""
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(f"--tasks needs lm-evaluation-harness: {INSTALL}") from err
    return lm_eval


def harness_model(model: torch.nn.Module, tokenizer, batch_size: int = 8,
                  max_length: int | None = None):
    """A `QatLM` over `model` (lm_eval imported here: it is optional)."""
    require_lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class QatLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
            self.max_length = max_length or getattr(model.config, "max_position_embeddings",
                                                    2048)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def device(self):
            return next(self.model.parameters()).device

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       **kwargs) -> list[int]:
            return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))[
                "input_ids"]

        def tok_decode(self, tokens: list[int]) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return [continuation_logprob(*scored) for scored in
                    score_continuations(self.model, [(c, t) for _, c, t in requests],
                                        self.batch_size, self.max_length)]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (text,) in (r.args for r in requests):
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                out.append(sum(continuation_logprob(*s)[0] for s in score_continuations(
                    self.model, windows, self.batch_size, self.max_length)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return [self._generate(*r.args) for r in requests]

        def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
            from qat.serve.generate import continue_text

            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            sample = bool(kwargs.pop("do_sample", False)) and kwargs.get("temperature", 1) > 0
            return continue_text(self.model, self.tokenizer, torch.tensor([ids]), max_new,
                                 until, sample=sample,
                                 temperature=float(kwargs.get("temperature", 1.0)),
                                 top_p=float(kwargs.get("top_p", 1.0)))

    return QatLM()


@torch.no_grad()
def score_continuations(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]],
                        batch_size: int, max_length: int
                        ) -> list[tuple[torch.Tensor, list[int]]]:
    """For each (context ids, continuation ids): the (len(continuation), V) log-probs the model
    gives each continuation token, and the tokens. The model reads at most `max_length` tokens
    (the context loses its start); batches are right-padded, longest first, results in input
    order."""
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = []
    for context, continuation in pairs:
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        inputs.append((whole[:-1], len(continuation)))
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i][0]))
    out: list[Any] = [None] * len(pairs)
    try:
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            length = max(len(inputs[i][0]) for i in rows)
            ids = torch.zeros(len(rows), length, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(inputs[i][0])] = torch.tensor(inputs[i][0])
            logprobs = torch.log_softmax(
                model(input_ids=ids.to(device), use_cache=False).logits.float(), -1).cpu()
            for r, i in enumerate(rows):
                n_in, n_cont = len(inputs[i][0]), inputs[i][1]
                out[i] = (logprobs[r, n_in - n_cont:n_in], list(pairs[i][1]))
    finally:
        model.train(model_was_training)
    return out


def continuation_logprob(logprobs: torch.Tensor, tokens: list[int]) -> tuple[float, bool]:
    """(sum of the continuation's log-probs, whether each token was the greedy one)."""
    target = torch.tensor(tokens, dtype=torch.long)
    total = float(logprobs.gather(-1, target[:, None]).sum())
    return total, bool((logprobs.argmax(-1) == target).all())


def task_names(tasks: str) -> tuple[list[str], Path | None]:
    """(task names, directory of task YAMLs to include) from --tasks: a comma-separated list of
    the harness's tasks, or a directory whose YAMLs' `task:` names are all run (it may also be
    given as DIR:name1,name2)."""
    path, _, chosen = tasks.partition(":") if ":" in tasks and Path(
        tasks.partition(":")[0]).is_dir() else (tasks, "", "")
    directory = Path(path).expanduser()
    if directory.is_dir():
        names = [n for n in chosen.split(",") if n] or sorted(
            line.split(":", 1)[1].strip() for yaml in directory.rglob("*.yaml")
            for line in yaml.read_text().splitlines() if line.startswith("task:"))
        if not names:
            raise ValueError(f"--tasks {tasks}: no task YAML (a `task:` line) in {directory}")
        return names, directory
    names = [n.strip() for n in tasks.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--tasks {tasks!r}: name tasks (hellaswag,arc_easy,...) or a directory "
                         "of task YAMLs")
    return names, None


def select_tasks(tasks: str):
    """(task names, lm_eval TaskManager that knows them) for --tasks, checked before any model
    loads. Raises ImportError saying how to install lm_eval, ValueError naming unknown tasks."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    names, directory = task_names(tasks)
    manager = TaskManager(include_path=str(directory) if directory else None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown to lm_eval: {', '.join(unknown)} (its task names, "
                         "e.g. hellaswag,arc_easy,piqa,winogrande,mmlu,gsm8k, or a directory "
                         "of task YAMLs)")
    return names, manager


def run_tasks(model: torch.nn.Module, tokenizer, tasks, num_fewshot: int | None = None,
              limit: float | None = None, batch_size: int = 8, log_samples: bool = False,
              seed: int = 0) -> dict[str, Any]:
    """lm_eval.simple_evaluate on `model` for `tasks` (--tasks text, or what select_tasks
    returned): the harness's results dict, JSON-ready (with `log_samples`, every request and
    the model's answer to it under "samples")."""
    import json

    lm_eval = require_lm_eval()
    from lm_eval.utils import handle_non_serializable

    names, manager = select_tasks(tasks) if isinstance(tasks, str) else tasks
    results = lm_eval.simple_evaluate(
        model=harness_model(model, tokenizer, batch_size), tasks=names, num_fewshot=num_fewshot,
        limit=limit, batch_size=batch_size, task_manager=manager, log_samples=log_samples,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=BOOTSTRAP_ITERS)
    return json.loads(json.dumps(results, default=handle_non_serializable))


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(task, metric, value, stderr) for every task's numeric metrics."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if not _filter or metric.endswith("_stderr") or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue  # sample_len, alias: not metrics
            err = metrics.get(f"{metric}_stderr,{_filter}")
            rows.append((task, f"{metric} ({_filter})" if _filter != "none" else metric,
                         f"{value:.4f}", f"{err:.4f}" if isinstance(err, (int, float)) else ""))
    return rows
