"""The soak test, short (15 s of traffic): `python -m bench soak` against the real
server process on the demo model. Mixed valid requests of every kind (each answer compared
with the one recorded alone before the traffic), 5% hostile or malformed ones, clients
hanging up mid-stream; afterwards nothing is held, RSS is flat, no 5xx, a clean SIGTERM exit.
The 10-minute run and its figures: docs/clients.md."""

import json

from bench.soak import main


def test_short_soak_leaks_nothing_and_answers_correctly(tmp_path):
    out = tmp_path / "soak.json"
    code = main(["--duration", "15", "--clients", "8", "--json", str(out)])
    result = json.loads(out.read_text())
    failed = {name: check["detail"] for name, check in result["checks"].items() if not check["pass"]}
    assert code == 0 and not failed, failed
    kinds = {row["kind"]: row for row in result["rows"]}
    assert len(kinds) >= 19 and all(row["ok"] > 0 for row in kinds.values())  # every kind was served
