"""The control-plane service and the job CLI: token, loopback by default, errors naming the field, 404s, logs
that follow, metrics; and the CLI against a real `aifab controller` and against the store alone."""

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aifab.jobs import records
from aifab.jobs.control import ControlPlane, ControlSettings
from aifab.jobs.records import JobSpec
from aifab.jobs.service import CONTROLLER_FILE, create_app
from aifab.schedule.state import Node
from aifab.store import Store
from aifab.web import BackgroundServer
from helpers import aifab, cli_env, until

POOL = [Node("n1", (0,), 2.0, 8.0)]
TOKEN = "s3cret"


@pytest.fixture
def plane(store: Store) -> Iterator[ControlPlane]:
    cp = ControlPlane(store, ControlSettings(POOL, poll_s=0.05))
    stop = threading.Event()
    loop = threading.Thread(target=cp.run, args=(stop,), daemon=True)
    loop.start()
    yield cp
    stop.set()
    loop.join(timeout=30)
    for job in records.list_jobs(store, ("running",)):
        if job.handle:
            cp.executor.kill(job.handle)
    cp.close()


@pytest.fixture
def client(plane: ControlPlane) -> Iterator[httpx.Client]:
    with (
        BackgroundServer(create_app(plane, token=TOKEN)) as srv,
        httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c,
    ):
        yield c


def test_token_is_required_once_configured(client: httpx.Client) -> None:
    for path in ("/healthz", "/v1/jobs", "/metrics"):
        assert httpx.get(f"{client.base_url}{path}").status_code == 401
        wrong = httpx.get(f"{client.base_url}{path}", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["type"] == "authentication_error"
        assert client.get(path).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"command": []}, "command"),
        ({"command": ["true"], "gpus": "many"}, "gpus"),
        ({"command": ["true"], "priority": 1.5}, "priority"),
        ({"command": ["true"], "colour": "red"}, "colour"),
        ({"name": "no command"}, "command"),
    ],
)
def test_bad_bodies_name_the_field(client: httpx.Client, body: dict[str, object], param: str) -> None:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["message"].startswith(f"{param}:")


def test_invalid_json_and_oversize_requests(client: httpx.Client) -> None:
    r = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/jobs", json={"name": "huge", "command": ["true"], "gpus": 8})
    assert r.status_code == 400
    assert "job 'huge' can never run on this pool: asks for 8 GPUs" in r.json()["error"]["message"]
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_unknown_job_is_404(client: httpx.Client) -> None:
    for method, path in (("GET", "/v1/jobs/42"), ("GET", "/v1/jobs/42/logs"), ("POST", "/v1/jobs/42/cancel")):
        r = client.request(method, path)
        assert r.status_code == 404, path
        assert "unknown job 42" in r.json()["error"]["message"]


def test_submit_follow_logs_and_metrics(client: httpx.Client) -> None:
    code = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.2)"
    r = client.post("/v1/jobs", json={"name": "counter", "command": [sys.executable, "-c", code]})
    assert r.status_code == 201
    job_id = r.json()["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}) as stream:
        text = b"".join(stream.iter_bytes()).decode()  # ends when the job does
    assert [f"line {i}" in text for i in range(3)] == [True] * 3
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert [e["event"] for e in job["events"]][-1] == "succeeded"
    assert "line 2" in client.get(f"/v1/jobs/{job_id}/logs").text
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    metrics = client.get("/metrics").text
    assert 'aifab_jobs{status="succeeded"} 1.0' in metrics
    for name in ("aifab_queue_depth", "aifab_gpus_allocated", "aifab_job_preemptions_total", "aifab_job_retries_total"):
        assert name in metrics


def test_cli_against_a_controller_on_loopback(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**cli_env(home), "AIFAB_CONTROL_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aifab", "controller", "--port", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        until(lambda: (home / CONTROLLER_FILE).exists() or proc.poll() is not None, "controller.json")
        info = json.loads((home / CONTROLLER_FILE).read_text())
        assert info["url"].startswith("http://127.0.0.1:") and info["token_required"] is True
        assert httpx.get(f"{info['url']}/healthz").status_code == 401

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "aifab", *args], env=env, capture_output=True, text=True, timeout=120
            )

        sub = cli("submit", "--name", "hi", "--json", "--", sys.executable, "-c", "print('hi from job')")
        assert sub.returncode == 0, sub.stderr
        job_id = json.loads(sub.stdout)["id"]
        until(lambda: json.loads(cli("status", str(job_id), "--json").stdout)["status"] == "succeeded", "the job")
        logs = cli("logs", str(job_id), "-f")
        assert "hi from job" in logs.stdout
        bad = cli("submit", "--gpus", "64", "--", "true")
        assert bad.returncode == 2 and "can never run on this pool: asks for 64 GPUs" in bad.stderr
        missing = cli("cancel", "99")
        assert missing.returncode == 2 and "unknown job 99" in missing.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "control plane on http://127.0.0.1:" in stderr
    assert not (home / CONTROLLER_FILE).exists()


def test_cli_without_a_controller_uses_the_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = cli_env(home)
    assert "AIFAB_CONTROL_URL" not in env
    sub = aifab("submit", "--json", "--priority", "5", "--", "true", home=home)
    assert sub.returncode == 0, sub.stderr
    job_id = json.loads(sub.stdout)["id"]
    status = aifab("status", "--json", home=home)
    assert [(j["id"], j["status"], j["priority"]) for j in json.loads(status.stdout)] == [(job_id, "pending", 5)]
    assert aifab("cancel", str(job_id), home=home).returncode == 0
    again = aifab("status", str(job_id), home=home)
    assert "cancelled" in again.stdout and "submitted" in again.stdout
    logs = aifab("logs", str(job_id), home=home)
    assert logs.returncode == 0 and logs.stdout == ""
    huge = aifab("submit", "--gpus", "4096", "--", "true", home=home)
    assert huge.returncode == 2 and "can never run on this machine" in huge.stderr
    bad = aifab("submit", "--project", "no spaces", "--", "true", home=home)
    assert bad.returncode == 2 and "job spec: project" in bad.stderr


def test_spec_round_trips_through_the_api(client: httpx.Client) -> None:
    spec = JobSpec(command=["true"], priority=3, project="p", kind="evaluate", env={"X": "1"}, max_retries=2)
    job = client.post("/v1/jobs", json=spec.model_dump()).json()
    assert {k: job[k] for k in ("priority", "project", "kind", "env", "max_retries")} == {
        "priority": 3,
        "project": "p",
        "kind": "evaluate",
        "env": {"X": "1"},
        "max_retries": 2,
    }
    assert os.path.basename(job["log_path"]) == "job.log"


def test_the_controller_takes_quotas_and_its_pool_from_a_config(tmp_path: Path) -> None:
    """`aifab controller --config factory.yaml`: its `orchestration:` pool has 2 GPUs, but project research may
    hold 1, so of two queued 1-GPU research jobs the second is placed only after the first has finished."""
    home = tmp_path / "home"
    config = tmp_path / "factory.yaml"
    config.write_text(
        "orchestration:\n"
        "  policy: priority-fair\n"
        "  quotas: {research: {gpus: 1}}\n"
        "  pool: [{name: box, gpus: 2, cpus: 4, memory_gb: 8}]\n"
    )
    store = Store(home)
    try:
        nap = [sys.executable, "-c", "import time; time.sleep(2)"]
        first, second = (records.submit(store, JobSpec(command=nap, gpus=1, project="research")) for _ in range(2))
    finally:
        store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aifab", "controller", "--port", "0", "--config", str(config)],
        env=cli_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        store = Store(home)
        try:
            until(lambda: records.get(store, second).status == "succeeded", "both jobs", timeout_s=120)
            ends = {e.event: e.at for e in records.events(store, first)}
            placed = {e.event: e.at for e in records.events(store, second)}
            assert placed["placed"] >= ends["succeeded"]
            assert {records.get(store, j).placement["node"] for j in (first, second)} == {"box"}  # type: ignore[index]
        finally:
            store.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert "priority-fair policy" in stderr and "2 GPUs" in stderr
