"""Caption cleaning's LLM backend: answer parsing, and the OpenAI-compatible client
against a local fake server (retries, cache, resume, refusals, interruption, secrets)."""

import http.server
import json
import logging
import threading
import time

import pytest

from cacophony_jax.curate import clean, llm
from tests.helpers import read_jsonl, write_jsonl

SECRET = "sk-test-7f3a9c-DO-NOT-LEAK"


def test_parse_caption():
    assert llm.parse_caption('Caption: "a dog barks twice."\n') == "A dog barks twice."
    assert llm.parse_caption("<think>hmm</think>\n\n- Rain falls on a roof") == \
        "Rain falls on a roof"
    assert llm.parse_caption("NONE") is None and llm.parse_caption("none.") is None
    assert llm.parse_caption("") is None
    # Chat models' courtesy words are not the caption.
    assert llm.parse_caption("Sure! Here is the caption:\nA dog barks.") == "A dog barks."
    assert llm.parse_caption("Here's the rewritten caption: rain on a roof.") == \
        "Rain on a roof."
    assert llm.parse_caption("Okay, here is a caption: birds sing") == "Birds sing"
    with pytest.raises(llm.RejectedError, match="declined"):
        llm.parse_caption("I cannot help with that request.")
    with pytest.raises(llm.RejectedError, match="declined"):
        llm.parse_caption("Sorry, there is nothing to describe.")
    # Captions that merely start like one are kept.
    for caption in ("Sorry-sounding groans echo in a hall.", "I can hear birds singing.",
                    "Here is a dog barking twice.", "Sure-footed horse trotting.",
                    "Okay lots of footsteps echo.", "Of course the rain falls."):
        assert llm.parse_caption(caption) == caption
    assert llm.parse_caption("Sure!\n\nA dog barks.") == "A dog barks."
    assert llm.parse_caption("Certainly. A dog barks.") == "A dog barks."
    with pytest.raises(llm.RejectedError, match="not one short caption"):
        llm.parse_caption("A very " + "very " * 200 + "loud dog.")


class FakeChatServer:
    """OpenAI-compatible /v1/chat/completions that answers from the user message."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail: list[int] = []  # status codes to answer with first, in order
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append(dict(path=self.path, headers=dict(self.headers),
                                               body=body))
                    code = owner.fail.pop(0) if owner.fail else 200
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                time.sleep(owner.delay)
                with owner.lock:
                    owner.in_flight -= 1
                user = body["messages"][-1]["content"]
                title = user.split("\n")[0].removeprefix("Title: ")
                if code == 200 and len(user) > 2000:
                    code, reply = 400, {"error": "This model's maximum context length is "
                                                 "4096 tokens; your request has 9000"}
                elif code != 200:
                    # A careless server echoing the credentials back in its error body.
                    reply = {"error": f"status {code}",
                             "echo": self.headers.get("Authorization", "")}
                else:
                    text = ("NONE" if "silence" in title else
                            "I'm sorry, I can't help with that." if "refuse" in title else
                            f"Caption: the sound of {title}.")
                    reply = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                  "content": text}}]}
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY", llm.ENV_BASE_URL, llm.ENV_MODEL, llm.ENV_API_KEY):
        monkeypatch.delenv(var, raising=False)
    s = FakeChatServer()
    yield s
    s.close()


def _clips(tmp_path, n, name="raw.jsonl"):
    rows = [{"id": f"c{i}", "audio": f"clips/{i}.wav", "title": f"bird song {i}",
             "tags": ["bird"], "description": f"Birds singing, take {i}. http://x.org"}
            for i in range(n)]
    path = tmp_path / name
    write_jsonl(path, rows)
    return path


def _llm(server, **kw):
    return dict(backend="llm", base_url=server.url, model="test-model", api_key=SECRET,
                backoff_s=0.001, progress=False, **kw)


def test_llm_request_format(tmp_path, server):
    src = _clips(tmp_path, 1)
    counts = clean.run_clean(str(src), str(tmp_path / "o.jsonl"), **_llm(server))
    assert counts["written"] == 1 and counts["requested"] == 1
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["body"]
    assert body["model"] == "test-model" and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == llm.SYSTEM_PROMPT
    # Links are removed before anything leaves the machine.
    assert body["messages"][1]["content"] == (
        "Title: bird song 0\nTags: bird\nDescription: Birds singing, take 0.")
    assert read_jsonl(tmp_path / "o.jsonl")[0]["captions"] == ["The sound of bird song 0."]


def test_llm_concurrent_requests_keep_input_order(tmp_path, server):
    server.delay = 0.05
    src = _clips(tmp_path, 12)
    counts = clean.run_clean(str(src), str(tmp_path / "o.jsonl"), workers=4, **_llm(server))
    assert counts["requested"] == 12 and len(server.requests) == 12
    assert 1 < server.max_in_flight <= 4
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert [r["id"] for r in rows] == [f"c{i}" for i in range(12)]
    assert rows[5]["captions"] == ["The sound of bird song 5."]


def test_llm_retries_then_succeeds(tmp_path, server):
    server.fail = [500, 429, 503]
    src = _clips(tmp_path, 1)
    counts = clean.run_clean(str(src), str(tmp_path / "o.jsonl"), workers=1, **_llm(server))
    assert counts["written"] == 1
    assert len(server.requests) == 4  # three failures, then the answer


def test_llm_gives_up_with_clear_error(tmp_path, server):
    server.fail = [500] * 10
    src = _clips(tmp_path, 1)
    with pytest.raises(llm.LLMError, match=r"failed 3 times \(last: HTTP 500") as info:
        clean.run_clean(str(src), str(tmp_path / "o.jsonl"), workers=1, max_retries=2,
                        **_llm(server))
    assert len(server.requests) == 3
    assert SECRET not in str(info.value)
    server.fail = [401]
    with pytest.raises(llm.LLMError, match=llm.ENV_API_KEY) as info:
        clean.run_clean(str(src), str(tmp_path / "o.jsonl"), workers=1, **_llm(server))
    assert len(server.requests) == 4  # a refusal is not retried
    assert SECRET not in str(info.value) and "[redacted]" in str(info.value)


def test_llm_failure_while_overwriting_keeps_the_old_output(tmp_path, server):
    src = _clips(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "old", "audio": "old.wav", "captions": ["An old caption."]}\n')
    old = out.read_text()
    server.fail = [200, 500]  # the first clip is answered, then the server is down
    with pytest.raises(llm.LLMError, match=r"failed 1 time \(last.*rerun the same command"
                                           r".*new rows are in .*out\.jsonl\.partial.*stays "
                                           r"as it was"):
        clean.run_clean(str(src), str(out), overwrite=True, workers=1, chunk_size=1,
                        max_retries=0, **_llm(server))
    assert out.read_text() == old
    partial = tmp_path / "out.jsonl.partial"
    assert [r["id"] for r in read_jsonl(partial)] == ["c0"]
    # Without --overwrite the unfinished new output is not silently left behind.
    with pytest.raises(clean.CleanError, match=r"out\.jsonl\.partial .*--overwrite"):
        clean.run_clean(str(src), str(out), **_llm(server))
    before = len(server.requests)
    counts = clean.run_clean(str(src), str(out), overwrite=True, **_llm(server))
    assert counts["resumed"] == 1 and counts["written"] == 2
    assert len(server.requests) - before == 2  # c0 is continued, not asked again
    assert [r["id"] for r in read_jsonl(out)] == ["c0", "c1", "c2"]
    assert not partial.exists()

def test_llm_cache_makes_reruns_free(tmp_path, server):
    src = _clips(tmp_path, 5)
    cache = str(tmp_path / "cache.sqlite")
    first = clean.run_clean(str(src), str(tmp_path / "a.jsonl"), cache_path=cache,
                            **_llm(server))
    assert first["requested"] == 5 and first["cached"] == 0
    second = clean.run_clean(str(src), str(tmp_path / "b.jsonl"), cache_path=cache,
                             **_llm(server))
    assert second["requested"] == 0 and second["cached"] == 5
    assert len(server.requests) == 5
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_llm_resume_after_interruption(tmp_path, server):
    src = _clips(tmp_path, 6)
    full = tmp_path / "full.jsonl"
    clean.run_clean(str(src), str(full), cache_path=str(tmp_path / "c1"), **_llm(server))
    lines = full.read_text().splitlines(keepends=True)
    # A crash in the middle of writing row 3: two whole rows and half a line.
    out = tmp_path / "out.jsonl"
    out.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    before = len(server.requests)
    counts = clean.run_clean(str(src), str(out), cache_path=str(tmp_path / "c2"),
                             **_llm(server))
    assert counts["resumed"] == 2 and counts["written"] == 4 and counts["requested"] == 4
    assert len(server.requests) - before == 4
    assert out.read_text() == full.read_text()


def test_llm_none_answer_skips_row(tmp_path, server):
    src = tmp_path / "raw.jsonl"
    write_jsonl(src, [{"audio": "a.wav", "title": "silence test"},
                       {"audio": "b.wav", "title": "frogs"}])
    counts = clean.run_clean(str(src), str(tmp_path / "o.jsonl"), **_llm(server))
    assert counts["empty"] == 1 and counts["written"] == 1


def test_llm_one_clip_refused_costs_that_clip_only(tmp_path, server, caplog):
    src = tmp_path / "raw.jsonl"
    write_jsonl(src, [{"audio": "a.wav", "title": "frogs"},
                       {"audio": "b.wav", "title": "x", "tags": ["t" * 50] * 200,
                        "description": "d" * 5000},  # cut to fit: answered
                       {"audio": "c.wav", "title": "please refuse"},
                       {"audio": "d.wav", "title": "owls", "description": "é" * 1500},
                       {"audio": "e.wav", "title": "bees"}])
    server.fail = []
    long_user = llm.user_message("owls", None, "é" * 1500)
    assert len(long_user) > 1500
    # The server's limit is 2,000 characters: the cut title, tags and description fit.
    assert len(llm.user_message("x", ["t" * 50] * 200, "d" * 5000)) < 2500
    out = tmp_path / "o.jsonl"
    with caplog.at_level(logging.WARNING):
        counts = clean.run_clean(str(src), str(out), **_llm(server))
    assert "line 3: no caption from the language model: the model declined" in caplog.text
    assert counts["rejected"] == counts["skipped"]
    assert counts["written"] + counts["rejected"] == 5
    assert [r["audio"] for r in read_jsonl(out)][0] == "a.wav"


def test_llm_context_length_refusal_skips_the_clip(tmp_path, server, caplog):
    src = tmp_path / "raw.jsonl"
    write_jsonl(src, [{"audio": "a.wav", "title": "frogs"},
                       {"audio": "b.wav", "title": "long", "description": "word " * 300,
                        "tags": ["tag" * 30] * 20},
                       {"audio": "c.wav", "title": "bees"}])
    with caplog.at_level(logging.WARNING):
        counts = clean.run_clean(str(src), str(tmp_path / "o.jsonl"), **_llm(server))
    assert counts["written"] == 2 and counts["rejected"] == 1
    assert "line 2: no caption from the language model: the server refused it as too long " \
           "(HTTP 400" in caplog.text


def test_llm_interruption_keeps_answers_and_drops_queued_requests(tmp_path, server,
                                                                  monkeypatch):
    src = _clips(tmp_path, 12)
    cache = tmp_path / "cache.sqlite"
    real_ask, calls = llm.LLMCaptioner._ask, []

    def ask(self, user):
        calls.append(user)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C while the fourth request is out
        if len(calls) > 4:
            time.sleep(0.5)  # time for the interrupted caller to drop the queue
        return real_ask(self, user)

    monkeypatch.setattr(llm.LLMCaptioner, "_ask", ask)
    with pytest.raises(KeyboardInterrupt):
        clean.run_clean(str(src), str(tmp_path / "o.jsonl"), cache_path=str(cache),
                        workers=1, **_llm(server))
    # Only the request in flight then (the fifth) may still go out; the rest are dropped.
    assert len(server.requests) in (3, 4) and len(calls) in (4, 5)
    monkeypatch.setattr(llm.LLMCaptioner, "_ask", real_ask)
    counts = clean.run_clean(str(src), str(tmp_path / "o.jsonl"), cache_path=str(cache),
                             **_llm(server))
    assert counts["cached"] == 3 and counts["requested"] == 9 and counts["written"] == 12


def test_api_key_never_leaks(tmp_path, server, monkeypatch, capsys, caplog):
    monkeypatch.setenv(llm.ENV_API_KEY, SECRET)
    monkeypatch.setenv(llm.ENV_BASE_URL, server.url)
    monkeypatch.setenv(llm.ENV_MODEL, "test-model")
    caplog.set_level(logging.DEBUG)
    src = _clips(tmp_path, 3)
    out = tmp_path / "o.jsonl"
    assert clean.main([str(src), str(out), "--backend=llm", "--workers=2"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 3
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    # The failure path: a 403 whose body echoes the header must not print the key.
    server.fail = [403]
    assert clean.main([str(src), str(tmp_path / "o2.jsonl"), "--backend=llm",
                       "--cache", str(tmp_path / "fresh.sqlite")]) == 1
    captured = capsys.readouterr()
    assert "refused the request (HTTP 403" in captured.err
    assert "key" not in repr(llm.LLMSettings.resolve()).lower()
    for text in (captured.out, captured.err, caplog.text):
        assert SECRET not in text
    for path in tmp_path.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path.name
