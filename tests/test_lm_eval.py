"""lm-eval 0.4.x against cadre, as a user would run it: `local-completions` with its default
settings (just the model name and the server's URL; it tokenizes through the server's
/tokenize), on local JSONL tasks of the three output types -- loglikelihood,
multiple_choice, generate_until -- beside lm-eval's `hf` model on the same checkpoint.
Every per-request loglikelihood must equal transformers' within 1e-3 (float32, CPU).

bench/lmeval.py writes the tasks (from the demo's held-out text) and runs the full version.
"""

import pytest

from bench.lmeval import TOLERANCE, cadre_args, compare, evaluate, hf_args, offline_environment, write_tasks
from server_live import serve

DOCS = 6
SERVED = "cadre-demo"


@pytest.fixture(scope="module")
def demo_runtime(tmp_path_factory):
    from models import Runtime, RuntimeConfig
    from models.demo import CHECKPOINT_DIR

    runtime = Runtime.from_checkpoint(CHECKPOINT_DIR, RuntimeConfig(device="cpu", dtype="float32"),
                                      store_dir=tmp_path_factory.mktemp("lmeval") / "store")
    yield runtime
    runtime.close()


@pytest.fixture
def one_task_index(monkeypatch):
    """lm-eval's TaskManager indexes every task it ships (~5.7 s here) and holds nothing else: both
    runs, given the same include_path, use one index; each still loads its tasks afresh from it."""
    import lm_eval.tasks

    build, built = lm_eval.tasks.TaskManager, {}  # (arguments) -> TaskManager

    def task_manager(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in built:
            built[key] = build(*args, **kwargs)
        return built[key]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", task_manager)


@pytest.mark.usefixtures("one_task_index")
def test_lm_eval_local_completions_matches_hf(demo_runtime, tmp_path, monkeypatch):
    from models.demo import CHECKPOINT_DIR

    offline_environment()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # lm-eval's caches stay in the test's directory
    tasks = write_tasks(tmp_path / "tasks", DOCS)
    with serve(demo_runtime, served_model_name=SERVED, max_model_len=None, max_concurrency=4) as server:
        server.wait_ready()
        cadre = evaluate("local-completions", cadre_args(server.url, SERVED), tasks, tmp_path / "tasks")
    hf = evaluate("hf", hf_args(CHECKPOINT_DIR), tasks, tmp_path / "tasks")
    rows = {row["task"]: row for row in compare(cadre, hf)}
    assert rows["cadre_ll"]["requests"] == DOCS and rows["cadre_mc"]["requests"] == 4 * DOCS
    for task in ("cadre_ll", "cadre_mc"):
        assert rows[task]["max_abs_diff"] <= TOLERANCE, rows[task]
        assert rows[task]["cadre"] == pytest.approx(rows[task]["hf"], rel=1e-4, abs=1e-3)  # perplexity: exp(nll)
    assert rows["cadre_gen"]["docs"] == DOCS
    assert rows["cadre_gen"]["same_text"] == DOCS  # greedy: the same lines as transformers' generate()
