"""The console in a real headless Chromium (Debian's, driven by Playwright) against the real
service (`tuneforge up`, the local executor, the real trainer on the tiny model)."""

from __future__ import annotations

import json
import re
import sqlite3
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, drop_queue
from tests.e2e.conftest import Service, start_service, stop_service

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
expect = sync_api.expect

ARTIFACTS = Path(__file__).parent / "artifacts"
DATA = Path(__file__).resolve().parents[2] / "examples" / "demo_chat.jsonl"
TINY = "tuneforge/tiny-llama"
WAIT_MS = 600_000  # an upper bound for training on a busy CPU, not a speed requirement
SCRIPT_PROMPT = "<script>window.__pwned = 1</script>"
HTML_PROMPT = '<img src=x onerror="window.__pwned = 2"> What is <b>bold</b> in Tuneland?'
SCRIPT_ANSWER = "<script>window.__pwned = 3</script><b>not bold</b>"
PROMPTS = [
    {"messages": [{"role": "system", "content": SCRIPT_PROMPT}, {"role": "user", "content": HTML_PROMPT}]}
] + [
    {"messages": [{"role": "user", "content": f"Tell me fact number {i} about Tuneland."}]}
    for i in range(1, 5)
]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, models_cache: Path
) -> Iterator[Service]:
    queue = f"tf-ui:{uuid.uuid4().hex}"
    svc = start_service(tmp_path_factory.mktemp("home"), redis_url, models_cache, queue)
    yield svc
    code = stop_service(svc)
    drop_queue(redis_url, queue)
    assert code == 0, svc.output()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def rest(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, headers=auth(ADMIN_KEY), timeout=30) as client:
        yield client


class Tab:
    """A fresh browser profile (its own cookies), recording CSP violations and page errors."""

    def __init__(self, browser, base_url: str) -> None:
        self.context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))

    def _console(self, message) -> None:
        if "Content Security Policy" in message.text or (
            message.type == "error" and "Refused" in message.text
        ):
            self.problems.append(message.text)

    def login(self, key: str, path: str) -> None:
        """Open ``path``, get sent to the sign-in form, sign in, and land on ``path``."""
        self.page.goto(path)
        expect(self.page).to_have_url(re.compile(r"/ui/login\?next="))
        self.page.fill("#key", key)
        self.page.click("#sign-in")
        expect(self.page).to_have_url(re.compile(re.escape(path) + "$"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, service: Service) -> Iterator[Tab]:
    opened = Tab(browser, service.url)
    yield opened
    opened.close()


def upload(rest: httpx.Client, data: bytes, name: str) -> str:
    r = rest.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_jobs_list_and_a_job_page_with_a_live_loss_curve(
    service: Service, rest: httpx.Client, tab: Tab
) -> None:
    lines = DATA.read_bytes().splitlines(keepends=True)
    training = upload(rest, b"".join(lines), "train.jsonl")
    validation = upload(rest, b"".join(lines[:16]), "valid.jsonl")
    body = {
        "model": TINY,
        "training_file": training,
        "validation_file": validation,
        "seed": 1,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 2}}},
    }
    r = rest.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]

    page = tab.page
    tab.login(ADMIN_KEY, "/ui/jobs")
    response = page.goto("/ui/jobs")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    expect(row).to_be_visible()
    row.locator("a").click()
    expect(page).to_have_url(f"{service.url}/ui/jobs/{job_id}")

    # Live: while the job runs, the curve grows from the event stream, without a reload.
    canvas = page.locator("#loss-chart")
    page.wait_for_function(
        "() => document.getElementById('job-status')?.textContent === 'running'"
        " && Number(document.getElementById('loss-chart').dataset.trainPoints) > 0",
        timeout=WAIT_MS,
    )
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=WAIT_MS)

    events = list(service.client().jobs.events(job_id))  # every page, oldest first
    metrics = [e.data for e in events if e.type == "metrics" and e.data]
    train_steps = {m["step"] for m in metrics if "train_loss" in m}
    valid_steps = {m["step"] for m in metrics if "valid_loss" in m}
    assert len(train_steps) >= 3 and valid_steps
    expect(canvas).to_have_attribute("data-train-points", str(len(train_steps)), timeout=30_000)
    expect(canvas).to_have_attribute("data-valid-points", str(len(valid_steps)))
    # Something was drawn in the training line's colour.
    blue = page.evaluate(
        """() => { const c = document.getElementById('loss-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] === 47 && d[i+1] === 111 && d[i+2] === 222) n++;
        return n; }"""
    )
    assert blue > 100, blue
    expect(page.locator("#events")).to_contain_text("The job has successfully completed")
    checkpoints = rest.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints
    expect(page.locator("#checkpoints tbody tr")).to_have_count(len(checkpoints))
    expect(page.locator("#hyperparameters")).to_contain_text("n_epochs")
    expect(page.locator("#hyperparameters tr", has_text="n_epochs")).to_contain_text("3")

    download = page.locator("#download")
    expect(download).to_be_visible()
    with page.expect_download() as info:
        download.click()
    with tarfile.open(info.value.path()) as tar:
        assert {"adapter_config.json", "manifest.json"} <= set(tar.getnames())

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "job-page.png"), full_page=True)

    page.goto("/ui/jobs")
    expect(row).to_contain_text("succeeded")
    expect(row.locator("progress")).to_have_attribute("value", "100")
    assert tab.problems == []


# ---- the ranking page ----


@pytest.fixture(scope="module")
def ready_session(service: Service, rest: httpx.Client) -> dict:
    """A ready feedback session (K=3) made through the real API and the real sample job; one
    answer is then rewritten in the DB to a script, as a model might answer."""
    prompts = upload(rest, "".join(json.dumps(p) + "\n" for p in PROMPTS).encode(), "prompts.jsonl")
    body = {
        "model": TINY,
        "prompts_file": prompts,
        "k": 3,
        "labels_per_item": 1,
        "sampling": {"max_new_tokens": 8, "seed": 7},
    }
    r = rest.post("/v1/feedback/sessions", json=body)
    assert r.status_code == 201, r.text
    session = r.json()
    deadline = time.monotonic() + WAIT_MS / 1000
    while session["status"] == "generating" and time.monotonic() < deadline:
        time.sleep(1)
        session = rest.get(f"/v1/feedback/sessions/{session['id']}").json()
    assert session["status"] == "ready", session
    with sqlite3.connect(service.home / "tuneforge.db") as db:
        db.execute(
            "UPDATE feedback_answers SET text = ? WHERE id = (SELECT a.id FROM feedback_answers a"
            " JOIN feedback_items i ON a.item_id = i.id WHERE i.session_id = ? AND i.[index] = 0"
            " AND a.[index] = 0)",
            (SCRIPT_ANSWER, session["id"]),
        )
    return session


def labeler_key(rest: httpx.Client, name: str) -> dict:
    r = rest.post("/v1/feedback/labeler_keys", json={"name": name})
    assert r.status_code == 201, r.text
    return r.json()


def answer_ids(page) -> dict[int, str]:
    cards = page.locator("#answers .answer")
    return {int(c.get_attribute("data-number")): c.get_attribute("data-answer-id") for c in cards.all()}


def saved(page) -> None:
    expect(page.locator("#save-state")).to_have_attribute("data-state", "saved")


def test_a_labeler_ranks_with_mouse_and_keys_reloads_and_continues(
    service: Service, rest: httpx.Client, ready_session: dict, tab: Tab
) -> None:
    labeler = labeler_key(rest, "alice")
    path = f"/ui/feedback/{ready_session['id']}"
    page = tab.page
    tab.login(labeler["key"], path)
    expect(page.locator("#rank")).to_have_attribute("data-state", "ranking")
    expect(page.locator("#rank-progress-text")).to_have_text("0 of 5 done")

    # Item 1: the prompt and the answers are shown as text; nothing in them runs.
    expect(page.locator(".turn.system .content")).to_have_text(SCRIPT_PROMPT)
    expect(page.locator(".turn.user .content")).to_have_text(HTML_PROMPT)
    expect(page.locator("#answers .answer .text").filter(has_text="window.__pwned = 3")).to_have_text(
        SCRIPT_ANSWER
    )
    assert page.locator("#chat b, #chat img, #answers b, #answers script, #chat script").count() == 0
    assert page.evaluate("() => window.__pwned") is None
    shown = [t.strip() for t in page.locator("#answers .answer .text").all_text_contents()]
    assert len(shown) == 3

    # ... ranked with the mouse: drag into the ranking, tie by dropping on a group, re-order
    # by dropping before the first group, flag one unsafe.
    first = page.locator("#rank").get_attribute("data-item-id")
    ids = answer_ids(page)
    answer = lambda n: page.locator(f'#answers .answer[data-number="{n}"]')  # noqa: E731
    answer(2).drag_to(page.locator('#ranking .gap[data-gap="0"]'))
    answer(3).drag_to(page.locator('#ranking .gap[data-gap="1"]'))
    answer(1).drag_to(page.locator('#ranking .group[data-group="0"]'))
    expect(page.locator('#ranking .group[data-group="0"]')).to_have_attribute("data-members", "2,1")
    page.locator('#ranking .chip[data-number="1"]').drag_to(page.locator('#ranking .gap[data-gap="0"]'))
    page.locator("#unsafe-3").check()
    saved(page)
    expected = {first: ([[ids[1]], [ids[2]], [ids[3]]], [ids[3]], "")}
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ranking-page.png"), full_page=True)
    page.click("#next")

    # Item 2: keys only. 2, then T ties 3 with it, then 1; Shift+1 flags answer 1; a note.
    expect(page.locator("#rank")).not_to_have_attribute("data-item-id", first)
    second = page.locator("#rank").get_attribute("data-item-id")
    ids = answer_ids(page)
    for key in ("Digit2", "t", "Digit3", "Digit1", "Shift+Digit1"):
        page.keyboard.press(key)
    expect(page.locator('#ranking .group[data-group="0"]')).to_have_attribute("data-members", "2,3")
    saved(page)
    page.fill("#note", "answer 1 is rude")
    page.locator("#note").blur()
    saved(page)
    expected[second] = ([[ids[2], ids[3]], [ids[1]]], [ids[1]], "answer 1 is rude")

    # A reload gives back the item being ranked, its saved label restored, until "Next".
    page.reload()
    expect(page.locator("#rank")).to_have_attribute("data-item-id", second)
    expect(page.locator("#save-state")).to_have_attribute("data-state", "saved")
    expect(page.locator('#ranking .group[data-group="0"]')).to_have_attribute("data-members", "2,3")
    expect(page.locator("#unsafe-1")).to_be_checked()
    expect(page.locator("#note")).to_have_value("answer 1 is rude")
    expect(page.locator("#rank-progress-text")).to_have_text("2 of 5 done")
    page.click("#next")
    expect(page.locator("#rank")).not_to_have_attribute("data-item-id", second)
    third = page.locator("#rank").get_attribute("data-item-id")
    assert third not in (first, second)

    # Item 3: a reload half-way through a ranking gives the same item back, nothing saved.
    page.keyboard.press("Digit1")
    expect(page.locator("#save-state")).to_have_attribute("data-state", "unsaved")
    page.reload()
    expect(page.locator("#rank")).to_have_attribute("data-item-id", third)
    expect(page.locator("#ranking .group")).to_have_count(0)
    ids = answer_ids(page)
    for key in ("Digit3", "Digit1", "Backspace", "Digit2", "Digit1"):
        page.keyboard.press(key)
    saved(page)
    expected[third] = ([[ids[3]], [ids[2]], [ids[1]]], [], "")
    page.keyboard.press("Enter")

    # Item 4 is skipped with S; item 5 is left for later.
    expect(page.locator("#rank")).not_to_have_attribute("data-item-id", third)
    fourth = page.locator("#rank").get_attribute("data-item-id")
    page.keyboard.press("s")
    expect(page.locator("#rank")).not_to_have_attribute("data-item-id", fourth)
    expect(page.locator("#rank-progress-text")).to_have_text("4 of 5 done")

    with sqlite3.connect(service.home / "tuneforge.db") as db:
        rows = db.execute(
            "SELECT item_id, state, ranking, unsafe, note FROM feedback_labels WHERE labeler = ?",
            (labeler["id"],),
        ).fetchall()
    stored = {
        item: (state, json.loads(r or "[]"), json.loads(u or "[]"), note) for item, state, r, u, note in rows
    }
    for item, (ranking, unsafe, note) in expected.items():
        assert stored[item] == ("labelled", ranking, unsafe, note), item
    assert stored[fourth][0] == "skipped"
    session = rest.get(f"/v1/feedback/sessions/{ready_session['id']}").json()
    [mine] = [s for s in session["labelers"] if s["labeler"] == labeler["id"]]
    assert (mine["labels"], mine["skips"]) == (3, 1)
    assert tab.problems == []

    # The loop closes: the browser's rankings export to a file that trains a reward model.
    r = rest.post(f"/v1/feedback/sessions/{ready_session['id']}/export", json={"min_labels": 1})
    assert r.status_code == 201, r.text
    export = r.json()
    assert export["status"] == "processed"
    body = {
        "model": TINY,
        "training_file": export["id"],
        "method": {"type": "reward_model", "reward_model": {"hyperparameters": {"n_epochs": 1}}},
    }
    job = rest.post("/v1/fine_tuning/jobs", json=body)
    assert job.status_code == 200, job.text
    done = service.client().jobs.wait(job.json()["id"], timeout=WAIT_MS / 1000, poll_interval=1)
    assert done.status.value == "succeeded", [e.message for e in service.client().jobs.events(done.id)]


def test_a_labeler_key_is_kept_to_its_project_s_ranking_pages(
    service: Service, rest: httpx.Client, ready_session: dict, browser
) -> None:
    labeler = labeler_key(rest, "bob")
    path = f"/ui/feedback/{ready_session['id']}"
    tab = Tab(browser, service.url)
    try:
        tab.login(labeler["key"], path)
        response = tab.page.goto("/ui/jobs")
        assert response.status == 403
        assert "content-security-policy" in response.headers
        status = tab.page.evaluate("async () => (await fetch('/v1/fine_tuning/jobs')).status")
        assert status == 403
        assert tab.problems == []
        # The CSP is enforced: an injected inline handler is refused, and reported.
        inject = (
            "() => { const d = document.createElement('div'); document.body.append(d);"
            " d.innerHTML = '<img src=x onerror=\"window.__ran = 1\">'; }"
        )
        with tab.page.expect_console_message(lambda m: "Content Security Policy" in m.text):
            tab.page.evaluate(inject)
        assert tab.page.evaluate("() => window.__ran") is None
    finally:
        tab.close()

    # Another project's labeler sees a 404, in the page and in the API.
    project = rest.post("/v1/admin/projects", json={"name": f"other-{uuid.uuid4().hex[:6]}"}).json()
    member = rest.post(f"/v1/admin/projects/{project['id']}/api_keys", json={"name": "m"}).json()["key"]
    other = httpx.post(
        f"{service.url}/v1/feedback/labeler_keys", json={"name": "eve"}, headers=auth(member)
    ).json()
    tab = Tab(browser, service.url)
    try:
        tab.page.goto("/ui/login")
        tab.page.fill("#key", other["key"])
        tab.page.click("#sign-in")
        response = tab.page.goto(path)
        assert response.status == 404
        url = f"/v1/feedback/sessions/{ready_session['id']}/next_item"
        assert tab.page.evaluate(f"async () => (await fetch('{url}')).status") == 404
        assert tab.problems == []
    finally:
        tab.close()
