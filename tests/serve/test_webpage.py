"""The chat page at /, end to end in headless Chromium (Debian's chromium driven by Playwright).

Needs `apt-get install chromium` (the page is tested in the browser users run, not a bundled one). A screenshot is
kept in test-artifacts/.
"""

import json
import os
import time
from pathlib import Path

import pytest

from serve_support import REPLIES, build_models, serve

pytestmark = pytest.mark.slow  # a real browser: the full suite runs it, the fast subset does not

CHROMIUM = os.environ.get("CHATFORGE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def models():
    return build_models()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors


def chat_requests(page) -> list[dict]:
    """The JSON bodies the page posts to the chat endpoint, as they happen."""
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
            else None)
    return sent


def send(page, text: str) -> None:
    page.locator("#input").click()
    page.keyboard.type(text)  # typed like a user (Chinese arrives as inserted text, as from an input method)
    page.keyboard.press("Enter")


def wait_idle(page) -> None:
    page.wait_for_function("() => !document.getElementById('send').disabled && "
                           "!document.querySelector('.message.streaming')")


def watch_replies(page) -> None:
    """Record every text the newest assistant reply shows, to see it grow while streaming."""
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const bodies = document.querySelectorAll('.message.assistant .body');
            if (bodies.length) window.seen.push(bodies[bodies.length - 1].textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")


def test_chat_page(models, page):
    with serve(models["chat"], slow=0.03) as srv:
        sent = chat_requests(page)
        page.goto(srv.url + "/?q=hello&message=hi#send")  # nothing in the URL is ever submitted
        page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny'")
        page.wait_for_timeout(300)
        assert sent == [] and page.input_value("#input") == ""
        assert page.is_hidden("#key-row")  # no key needed, none asked for
        page.fill("#temperature", "0")
        # An Enter that picks characters in an input method (pinyin) does not send the half-typed message.
        page.fill("#input", "ni")
        page.eval_on_selector("#input", "el => el.dispatchEvent(new KeyboardEvent('keydown', "
                                        "{key: 'Enter', isComposing: true, bubbles: true, cancelable: true}))")
        page.wait_for_timeout(200)
        assert sent == [] and page.input_value("#input") == "ni"
        page.fill("#input", "")

        # A streamed reply in Chinese, typed in Chinese.
        watch_replies(page)
        send(page, "你好")
        wait_idle(page)
        reply = page.locator(".message.assistant .body").last.text_content()
        assert reply == REPLIES["你好"]
        seen = [s for s in dict.fromkeys(page.evaluate("window.seen")) if s]
        assert len(seen) >= 3 and all(reply.startswith(s) for s in seen)  # it grew piece by piece
        assert page.locator(".message.user .body").first.text_content() == "你好"

        # A second turn carries the history, the system prompt and the controls.
        page.fill("#system", "Be brief.")
        page.fill("#max-tokens", "5")
        send(page, "hello")
        wait_idle(page)
        assert sent[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "你好"},
                                        {"role": "assistant", "content": REPLIES["你好"]},
                                        {"role": "user", "content": "hello"}]
        assert sent[-1]["max_tokens"] == 5 and sent[-1]["temperature"] == 0 and sent[-1]["stream"] is True
        assert page.locator(".message").count() == 4
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webpage-chat.png"))

        # New chat forgets everything; model output with Markdown, code and HTML renders safely.
        page.click("#new-chat")
        assert page.locator(".message").count() == 0
        page.fill("#system", "")
        page.fill("#max-tokens", "100")
        send(page, "code")
        wait_idle(page)
        assert sent[-1]["messages"] == [{"role": "user", "content": "code"}]
        body = page.locator(".message.assistant .body").last
        assert body.locator("strong").text_content() == "Bold"
        assert body.locator("pre code").text_content() == "<script>pwned=1</script>"
        assert "<img src=x onerror=pwned=2>" in body.text_content()
        assert page.locator("#messages script, #messages img").count() == 0
        assert page.evaluate("typeof window.pwned") == "undefined"
        page.screenshot(path=str(ARTIFACTS / "webpage.png"))


def test_stop_and_new_chat(models, page):
    with serve(models["random"], slow=0.03) as srv:
        sent = chat_requests(page)
        page.goto(srv.url + "/")
        page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny'")
        page.fill("#max-tokens", "200")
        scheduler = srv.app.state.scheduler
        for _ in range(5):  # the random model ends its turn within 5 characters in ~8% of its (unseeded) samples
            generated_before = scheduler.generated_tokens
            send(page, "tell me a long story")
            page.wait_for_function("() => { const m = document.querySelector('.message.assistant'); return m && "
                                   "(m.querySelector('.body').textContent.length > 5 || "
                                   "!m.classList.contains('streaming')); }")
            if page.locator(".message.assistant.streaming").count():
                break
            wait_idle(page)
            page.click("#new-chat")
        else:
            pytest.fail("five replies in a row ended before their sixth character")
        assert page.is_enabled("#stop") and page.is_disabled("#send")
        page.click("#stop")
        wait_idle(page)
        assert page.is_disabled("#stop")
        stopped = page.locator(".message.assistant")
        assert "stopped" in stopped.get_attribute("class")
        text = stopped.locator(".body").text_content()
        deadline = time.monotonic() + 5
        while scheduler.outstanding and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.outstanding == 0  # the server stopped generating too
        page.wait_for_timeout(300)
        assert stopped.locator(".body").text_content() == text and scheduler.generated_tokens - generated_before < 200

        page.click("#new-chat")
        assert page.locator(".message").count() == 0
        page.fill("#max-tokens", "3")
        send(page, "again")
        wait_idle(page)
        assert sent[-1]["messages"] == [{"role": "user", "content": "again"}]


def test_page_asks_for_the_key_when_the_server_needs_one(models, page):
    with serve(models["chat"], api_key="page-key") as srv:
        page.goto(srv.url + "/")
        page.wait_for_selector("#key-row:not([hidden])")
        assert "API key" in page.text_content("#status")
        page.fill("#api-key", "page-key")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny'")
        page.fill("#temperature", "0")
        send(page, "hello")
        wait_idle(page)
        assert page.locator(".message.assistant .body").last.text_content() == REPLIES["hello"]
        assert page.evaluate("sessionStorage.getItem('chatforge-api-key')") == "page-key"
        assert page.evaluate("localStorage.length") == 0  # the key does not outlive the tab
