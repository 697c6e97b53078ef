"""bench spy-report reads py-spy's raw (collapsed) stacks: the decoding thread's samples under
Decoder._replay by step of the loop, innermost function and path; the workers' busy samples; a
profile without replayed steps is refused (exit 2, one line)."""

from bench import spy_report

PROCESS = 'process 1:"python3 -m bench decode"'


def line(thread: str, frames: list[str], count: int) -> str:
    return ";".join([PROCESS, f"thread ({thread[1]}): {thread[0]}"] + frames) + f" {count}"


REPLAY = ["main (bench/decode.py:1)", "Decoder.generate (models/decoder.py:566)"]
PROFILE = "\n".join([
    line(("MainThread", 1), REPLAY + ["Decoder._replay (models/decoder.py:482)", "ExpertLayer.needed (models/experts.py:171)"], 30),
    line(("MainThread", 1), REPLAY + ["Decoder._replay (models/decoder.py:487)", "ExpertLayer.acquire (models/experts.py:179)",
                                      "ExpertCache.acquire (models/cache.py:404)", "Condition.wait (threading.py:355)"], 60),
    line(("MainThread", 1), ["main (bench/decode.py:1)", "load (x.py:1)"], 500),  # outside the replay: left out
    line(("cadre-reader_0", 2), ["Thread.run (threading.py:1)", "_worker (thread.py:1)", "pread_into (sf.py:65)"], 40),
    line(("cadre-loader_0", 3), ["Thread.run (threading.py:1)", "_worker (thread.py:1)"], 900),  # idle
    "",
])


def test_shares_of_the_replayed_steps_and_the_workers(tmp_path, capsys):
    path = tmp_path / "spy.txt"
    path.write_text(PROFILE)
    assert spy_report.main([str(path), "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "decoding thread under Decoder._replay, by step of its loop (line: call): 90 samples" in out
    assert "60  66.7%  Decoder._replay:487 ExpertLayer.acquire" in out
    assert "30  33.3%  ExpertLayer.needed" in out
    assert "60  66.7%  ExpertLayer.acquire > ExpertCache.acquire" in out
    assert "busy samples (idle waits left out): 40 samples" in out and "pread_into" in out


def test_a_profile_without_replayed_steps_is_refused(tmp_path, capsys):
    path = tmp_path / "spy.txt"
    path.write_text(line(("MainThread", 1), ["main (bench/decode.py:1)"], 5) + "\n")
    assert spy_report.main([str(path)]) == 2
    assert spy_report.main([str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no samples of Decoder._replay" in err[0] and "no such file" in err[1]
