"""The container runs exactly the server command the tests run outside Docker.

tests/test_dashboard_e2e.py starts compose_helpers.server_command("127.0.0.1", PORT) with
this venv's python; the image's ENTRYPOINT + CMD must be the same command with the
container's host and port, so what the tests exercise is what `docker compose up` runs.
"""

from __future__ import annotations

import json
import re

from compose_helpers import DOCKERFILE, exec_form, final_stage, server_command

PINNED_FROM = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}( AS \w+)?$")


def test_entrypoint_and_cmd_are_the_tested_server_command():
    stage = final_stage()
    argv = exec_form(stage, "ENTRYPOINT") + exec_form(stage, "CMD")
    assert argv == server_command("0.0.0.0", 8000)


def test_python_in_the_image_is_the_venv_cadre_is_installed_in():
    env = " ".join(args for keyword, args in final_stage() if keyword == "ENV")
    assert re.search(r"\bPATH=/opt/venv/bin:\$PATH\b", env)
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final_stage()


def test_healthcheck_probes_health_with_python_alone():
    (healthcheck,) = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]  # no curl in a slim image
    assert "http://127.0.0.1:8000/health" in argv[2]
    assert "--timeout=" in options and "--interval=" in options


def test_runs_as_a_non_root_user_with_a_passwd_entry():
    stage = final_stage()
    (user,) = [args for keyword, args in stage if keyword == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    run = " ".join(args for keyword, args in stage if keyword == "RUN")
    assert re.search(rf"useradd .*--uid {uid}\b", run), "USER needs a passwd entry"
    last_user = max(i for i, (keyword, _) in enumerate(stage) if keyword == "USER")
    last_entry = max(i for i, (keyword, _) in enumerate(stage) if keyword in ("ENTRYPOINT", "CMD"))
    assert last_user < last_entry


def test_store_model_and_cache_directories_are_volumes():
    (volume,) = [args for keyword, args in final_stage() if keyword == "VOLUME"]
    assert set(json.loads(volume)) == {"/models", "/stores", "/cache"}
    env = " ".join(args for keyword, args in final_stage() if keyword == "ENV")
    assert "CADRE_CACHE_DIR=/cache" in env  # the demo model's store is built on the volume


def test_every_stage_is_on_base_image_whose_default_is_pinned_by_digest_and_cpu_torch_is_the_default():
    """Users get the pinned official image; CI passes BASE_IMAGE (a local debootstrap base)."""
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (.+)$", text, flags=re.MULTILINE)
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]
    (default,) = re.findall(r"^ARG BASE_IMAGE=(.+)$", text, flags=re.MULTILINE)
    assert PINNED_FROM.match(default), default
    assert text.index("ARG BASE_IMAGE=") < text.index("FROM ")  # global ARG: visible to every FROM
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '"torch==${TORCH_VERSION}"' in text and "ARG TORCH_VERSION=2.13.0" in text


def test_no_syntax_line_and_python3_for_debian_bases():
    """`# syntax=` makes BuildKit pull a frontend from a registry; Debian has no `python`."""
    text = DOCKERFILE.read_text()
    assert "# syntax=" not in text
    assert "python3 -m venv /opt/venv" in text and "python -m venv" not in text
