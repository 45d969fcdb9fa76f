"""The built-in chat page at /, in a real browser (Debian's chromium driven by Playwright) against a real
server on the default model, with a 4+124 cache so that a long paste evicts at once.

Skipped without a chromium binary (`.ci/run` installs it). A failing test leaves a screenshot under the
pytest base temp dir's artifacts/. STREAMLLM_WEBCHAT_SCREENSHOT=PATH also saves the page mid-conversation
there (the README's docs/figures/webchat.png).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from streaming_core.loader import LoadedModel

from .conftest_http import KEY_A, LiveServer, make_engine, make_settings

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = (
    os.environ.get("STREAMLLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
if CHROMIUM is None:
    pytest.skip("no chromium binary (apt-get install chromium)", allow_module_level=True)

WINDOW = 124
PASTE = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(40))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, default_model: LoadedModel) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("webchat")
    server = LiveServer(make_settings(data_dir, (KEY_A,)), make_engine(default_model, 2, window=WINDOW))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(
    browser: Any, live: LiveServer, request: pytest.FixtureRequest, tmp_path_factory: Any
) -> Iterator[Any]:
    """A fresh browser profile on the page; every request it makes is recorded in `page.urls`."""
    failed_before = request.session.testsfailed
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.urls = []
    page.on("request", lambda r: page.urls.append(r.url))
    page.set_default_timeout(60_000)
    yield page
    if request.session.testsfailed > failed_before:
        shot = tmp_path_factory.getbasetemp() / "artifacts" / f"{request.node.name}.png"
        shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the failed page: {shot}")
    context.close()


def server_session(live: LiveServer, sid: str) -> dict[str, Any] | None:
    r = httpx.get(f"{live.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY_A}"})
    return r.json() if r.status_code == 200 else None


def current_id(page: Any) -> str:
    sid: str = page.evaluate("localStorage.getItem('streamllm.current')")
    return sid


def send(page: Any, text: str) -> list[int]:
    """Type `text` and press Enter; returns the reply's lengths seen while it streamed, once it is done."""
    replies = page.locator(".msg.assistant")
    before = replies.count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function(f"() => document.querySelectorAll('.msg.assistant').length > {before}")
    lengths: list[int] = []
    while not page.is_disabled("#stop"):
        lengths.append(len(replies.last.locator(".text").inner_text()))
        time.sleep(0.05)
    page.wait_for_function("() => document.getElementById('stat-turns').textContent !== '–'")
    return lengths


def wait_turns(page: Any, turns: int) -> None:
    page.wait_for_function(f"() => document.getElementById('stat-turns').textContent === '{turns}'")


def test_chat_page_end_to_end(page: Any, live: LiveServer) -> None:
    page.goto(live.url)
    page.wait_for_selector("#auth:not([hidden])")  # 401 without a key: the page asks for one
    page.fill("#api-key", KEY_A)
    page.check("#remember-key")
    page.wait_for_function("() => document.getElementById('model').textContent === 'SmolLM2-135M-Instruct'")
    page.fill("#max-tokens", "40")
    page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")

    lengths = send(page, "Name three colors.")
    assert len({n for n in lengths if n > 0}) >= 3, f"the reply did not stream in: {lengths}"
    wait_turns(page, 1)
    sid = current_id(page)
    info = server_session(live, sid)
    assert info is not None and info["turns"] == 1 and info["last_turn"]["mode"] == "new"
    last = info["last_turn"]  # a new session: cached is only a head prefix reuse copied from another slot
    assert last["cached_tokens"] < last["prompt_tokens"] // 2
    assert page.inner_text("#stat-cached") == f"{last['cached_tokens']:,} of {last['prompt_tokens']:,} (new)"
    assert page.inner_text("#stat-ttft").endswith(" ms") and page.inner_text("#stat-speed").endswith(" tok/s")

    # A reload continues the same conversation, in delta mode; the key was remembered.
    page.reload()
    wait_turns(page, 1)
    assert current_id(page) == sid and page.locator(".msg.user").count() == 1
    send(page, "And one more?")
    wait_turns(page, 2)
    info = server_session(live, sid)
    assert info is not None and info["last_turn"]["mode"] == "delta"
    cached = info["last_turn"]["cached_tokens"]
    assert cached > 0 and page.inner_text("#stat-cached").startswith(f"{cached} of ")
    assert page.inner_text("#stat-evicted") == "0"

    # A long paste pushes the session past its window: the evicted count rises, the window stays full.
    send(page, f"Summarize this:\n{PASTE}")
    wait_turns(page, 3)
    info = server_session(live, sid)
    assert info is not None and info["evicted"] > 0
    assert info["cache_tokens"] == info["sink_tokens"] + info["window"] == 4 + WINDOW
    assert page.inner_text("#stat-evicted") == f"{info['evicted']:,}"
    assert page.inner_text("#stat-window") == f"{info['window']} / {info['window']}"
    # Stop (Escape) aborts the stream; the server keeps only finished turns, and the next turn goes on.
    page.fill("#max-tokens", "200")
    page.fill("#prompt", "Write a long story about a dragon.")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant:last-child .text').textContent.length > 60"
    )
    if target := os.environ.get("STREAMLLM_WEBCHAT_SCREENSHOT"):  # mid-reply, past the window
        page.screenshot(path=target)
    page.keyboard.press("Escape")
    page.wait_for_selector(".msg.assistant.stopped")
    assert server_session(live, sid)["turns"] == 3  # type: ignore[index]
    page.fill("#max-tokens", "16")
    send(page, "Just say hi.")
    wait_turns(page, 4)

    # Regenerate resends this page's history: the server rebuilds the session from it and says so.
    page.click("#regenerate")
    wait_turns(page, 5)
    info = server_session(live, sid)
    assert info is not None and info["last_turn"]["mode"] == "rebuilt"
    last = info["last_turn"]  # cached: only what prefix reuse copied from a slot holding the same head
    assert (
        page.inner_text("#stat-cached") == f"{last['cached_tokens']:,} of {last['prompt_tokens']:,} (rebuilt)"
    )
    page.wait_for_selector("text=rebuilt the session from this page's history")

    # Edit last: the message comes back to the box; the edited history diverges, and the session is rebuilt.
    rebuilds = info["rebuilds"]
    page.click("#edit")
    assert page.input_value("#prompt") == "Just say hi."
    page.fill("#prompt", "Just say bye.")
    page.press("#prompt", "Enter")
    wait_turns(page, 6)
    info = server_session(live, sid)
    assert info is not None and info["last_turn"]["mode"] == "rebuilt" and info["rebuilds"] == rebuilds + 1
    assert page.locator(".msg.user").last.inner_text() == "Just say bye."
    assert page.locator(".msg.user", has_text="Just say hi.").count() == 0

    # Rename (kept in the browser), then delete: the server forgets the session, the page starts a new one.
    page.once("dialog", lambda d: d.accept("colors"))
    page.click(f"li[data-id='{sid}'] .rename")
    page.wait_for_function("() => document.getElementById('session-name').textContent === 'colors'")
    page.click(f"li[data-id='{sid}'] .delete")
    page.wait_for_function(f"() => localStorage.getItem('streamllm.current') !== '{sid}'")
    assert server_session(live, sid) is None
    assert page.locator(f"li[data-id='{sid}']").count() == 0

    # Keyboard only: Tab leaves the message box for the send button; nothing came from another origin.
    page.focus("#prompt")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"
    assert all(u.startswith(live.url) for u in page.urls), [
        u for u in page.urls if not u.startswith(live.url)
    ]


def test_markdownish_rendering(page: Any, live: LiveServer) -> None:
    """Code fences and inline code become elements; the model's text never becomes markup."""
    page.goto(live.url)
    html = page.evaluate(
        """async (text) => {
            const { renderText } = await import("/web/render.js");
            const el = document.createElement("div");
            renderText(el, text);
            return el.innerHTML;
        }""",
        "Use `x` here:\n```py\nprint('<b>')\n```\nand <i>this</i>.",
    )
    assert html == (
        "Use <code>x</code> here:\n<pre><code data-lang=\"py\">print('&lt;b&gt;')\n</code></pre>"
        "\nand &lt;i&gt;this&lt;/i&gt;."
    )
