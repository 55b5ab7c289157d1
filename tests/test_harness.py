"""lm-evaluation-harness on qat's models (qat.eval.harness, `qat-eval --tasks`), offline: local
task YAMLs over local JSON files, a multiple-choice task and a generate_until task."""
import json
import sys
from pathlib import Path

import pytest
import torch

from qat.eval.__main__ import main

MC_TASK = "qat_test_mc"
GEN_TASK = "qat_test_gen"


@pytest.fixture
def tiny_export(tiny_run):
    return tiny_run[0] / "export"


def write_task(directory: Path, name: str, rows: list[dict], body: str) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}")


def mc_rows():
    return [{"question": f"Item {i}: the colour of the sea is", "choices": [" blue", " red",
                                                                            " loud"],
             "answer": i % 3} for i in range(5)]


def multiple_choice(directory: Path) -> None:
    write_task(directory, MC_TASK, mc_rows(), "output_type: multiple_choice\n"
               'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
               'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) from one unpadded forward pass, the continuation's tokens
    being what follows the context's in the tokenized whole (the harness's split)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    rows = logprobs[n - 1:len(whole) - 1]
    target = torch.tensor(whole[n:])
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_the_harness_scores_each_choice_as_the_exported_model_does(tiny_export, tmp_path):
    """The per-choice log-likelihoods the harness sees equal those computed directly from
    qat.load_quantized's logits, and its accuracy is the argmax over them."""
    from transformers import AutoTokenizer

    from qat import load_quantized
    from qat.eval.harness import run_tasks

    multiple_choice(tmp_path)
    model = load_quantized(tiny_export, dtype=torch.float32, backend="reference")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_export))
    results = run_tasks(model, tokenizer, str(tmp_path), batch_size=4, log_samples=True)
    samples = results["samples"][MC_TASK]
    assert len(samples) == 5
    right = 0
    for sample in samples:
        seen = [tuple(r) for r in sample["filtered_resps"]]
        direct = [direct_loglikelihood(model, tokenizer, *args) for args in sample["arguments"]]
        for (ll, greedy), (want, want_greedy) in zip(seen, direct):
            assert ll == pytest.approx(want, rel=1e-5, abs=1e-4) and greedy == want_greedy
        right += max(range(3), key=lambda i: direct[i][0]) == sample["target"]
    assert results["results"][MC_TASK]["acc,none"] == pytest.approx(right / 5)


def test_generate_until_writes_greedy_text_up_to_the_stop_string(tiny_export, tmp_path, capsys):
    """A generate_until task through qat-eval: each answer is Hugging Face's greedy continuation
    of the prompt cut before the task's stop string, and exact_match counts answers equal to the
    target; lm_eval.json lands beside eval.json."""
    from transformers import AutoTokenizer

    from qat import load_quantized

    model = load_quantized(tiny_export, dtype=torch.float32, backend="auto")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_export))
    prompts = ["A B C D", "the quick brown fox", "The cat sat on the", "Once upon a time"]
    greedy = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False, pad_token_id=0)
        greedy.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    # a stop string an answer really writes after its start (the tiny model repeats itself, so
    # its last characters): generation must stop there
    first = next(i for i, text in enumerate(greedy) if text[-3:] and text.index(text[-3:]) > 0)
    prompts.insert(0, prompts.pop(first))
    greedy.insert(0, greedy.pop(first))
    prompts, greedy = prompts[:3], greedy[:3]
    stop = greedy[0][-3:]
    wanted = [text.split(stop, 1)[0] for text in greedy]
    assert wanted[0] and wanted[0] != greedy[0]
    rows = [{"question": p, "answer": wanted[i] if i < 2 else "never written"}
            for i, p in enumerate(prompts)]
    write_task(tmp_path, GEN_TASK, rows, "output_type: generate_until\n"
               'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
               f"generation_kwargs:\n  until: [{json.dumps(stop)}]\n  max_gen_toks: 12\n"
               "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    multiple_choice(tmp_path)
    out = tmp_path / "out" / "eval.json"
    assert main([str(tiny_export), "--data", "none", "--tasks", f"{tmp_path}:{GEN_TASK}",
                 "--log-samples", "--out", str(out)]) == 0
    harness = json.loads((out.parent / "lm_eval.json").read_text())
    answers = [s["filtered_resps"][0] for s in
               sorted(harness["samples"][GEN_TASK], key=lambda s: s["doc_id"])]
    assert answers == wanted
    assert harness["results"][GEN_TASK]["exact_match,none"] == pytest.approx(2 / 3)
    assert list(harness["results"]) == [GEN_TASK]  # DIR:name picks it alone
    assert json.loads(out.read_text())["lm_eval"]["file"] == "lm_eval.json"
    assert "exact_match" in capsys.readouterr().out


def test_tasks_are_checked_before_the_model_loads(tiny_export, tmp_path, capsys, monkeypatch):
    assert main([str(tiny_export), "--data", "none", "--tasks", "no_such_task_anywhere",
                 "--out", str(tmp_path / "eval.json")]) == 2
    assert "no_such_task_anywhere" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tiny_export), "--data", "none", "--tasks", str(tmp_path / "empty")]) == 2
    assert "no task YAML" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert main([str(tiny_export), "--data", "none", "--tasks", "hellaswag"]) == 2
    assert "pip install 'qat[eval]'" in capsys.readouterr().err
