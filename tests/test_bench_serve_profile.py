"""bench serve --profile prints, per server thread, the cadre functions most often on its stack
(from the server's collapsed stacks, POST /debug/profile), each counted once per sample."""

from bench.serve import profile_summary

STACKS = """cadre-decoder;threading.py:run:982;server/decode_engine.py:_run:180;models/decoder.py:decode:313;models/decoder.py:_step:385 6
cadre-decoder;threading.py:run:982;server/decode_engine.py:_run:180;server/decode_engine.py:_next_commands:197 2
cadre-decoder;threading.py:run:982;server/decode_engine.py:_run:181;server/decode_engine.py:_run:150 2
MainThread;asyncio/runners.py:run:118 10
"""


def test_each_thread_lists_its_cadre_functions_by_share_of_samples():
    lines = profile_summary(STACKS)
    assert lines[0] == "  cadre-decoder: 10 samples"
    shares = {line.split()[1]: line.split()[0] for line in lines[1:]}
    # _run is on every sample once, though twice on the last stack's
    assert shares == {"server/decode_engine.py:_run": "100.0%", "models/decoder.py:decode": "60.0%",
                      "models/decoder.py:_step": "60.0%", "server/decode_engine.py:_next_commands": "20.0%"}
    assert not any("MainThread" in line for line in lines)  # no cadre frame on its stack
