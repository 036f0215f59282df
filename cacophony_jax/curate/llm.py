"""Caption cleaning with a language model behind the OpenAI-compatible chat API.

Protocol: ``POST {base_url}/chat/completions`` with ``{"model", "messages",
"temperature", "max_tokens"}``; the caption is ``choices[0].message.content``. Any
server speaking it works: vLLM (``vllm serve MODEL`` -> ``http://host:8000/v1``), the
llama.cpp server (``http://host:8080/v1``), Ollama (``http://host:11434/v1``) or a
hosted API. Settings come from arguments or CACOPHONY_LLM_BASE_URL,
CACOPHONY_LLM_MODEL and CACOPHONY_LLM_API_KEY. The key is only ever sent as a Bearer
header: it is kept out of reprs, logs, error messages and the cache.

Batching: one clip per request and `workers` requests in flight (a thread pool).
Servers such as vLLM batch concurrent requests on the accelerator themselves, so this
gets batched throughput while a malformed answer costs one clip, never a whole list,
and every clip is cached on its own.

Cache: a sqlite3 file keyed by sha256 of (model, system prompt, user message), so a
rerun (after a crash, or with more input) never repeats a request.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request

from cacophony_jax.curate import rules_text

ENV_BASE_URL = "CACOPHONY_LLM_BASE_URL"
ENV_MODEL = "CACOPHONY_LLM_MODEL"
ENV_API_KEY = "CACOPHONY_LLM_API_KEY"

# The instruction every request starts with. It asks for what the training captions
# need (audible content only, one short sentence) and a fixed word for "nothing".
SYSTEM_PROMPT = """\
You rewrite the metadata of a recording from a web sound library into one caption of \
what the recording sounds like.
Rules:
- Describe only what can be heard: the sound sources, what they do, and the acoustic scene.
- One plain English sentence of 5 to 20 words, present tense, no quotation marks.
- Leave out titles, names of people and users, dates, recording equipment and settings, \
file names and formats, licences, links and anything about the uploader.
- Do not invent sounds the metadata does not suggest.
- If the metadata says nothing about what can be heard, answer exactly: NONE
Answer with the caption only."""

_DESCRIPTION_CHARS = 1500  # longer descriptions are cut: the start says what it is
_TITLE_CHARS, _TAGS_CHARS = 300, 600  # so is a title or tag list, to keep within context
_CAPTION_CHARS = 300  # a longer answer is not the one short sentence asked for


class LLMError(RuntimeError):
    """The LLM server could not be reached, refused the request, or answered nonsense."""


class LLMConfigError(ValueError):
    """The LLM backend is missing a setting (names the argument and variable)."""


class RejectedError(ValueError):
    """One clip's request or answer cannot give a caption (the clip is skipped): the
    server refused its request as too long, or the answer is not a caption."""


@dataclasses.dataclass(frozen=True)
class LLMSettings:
    """Where and how to ask; `api_key` never appears in the repr."""

    base_url: str
    model: str
    api_key: str = dataclasses.field(default="", repr=False)
    temperature: float = 0.0  # deterministic answers make the cache meaningful
    max_tokens: int = 96
    timeout_s: float = 120.0
    max_retries: int = 5  # attempts after the first, on connection errors/429/5xx
    backoff_s: float = 1.0  # first wait; doubles per retry
    max_backoff_s: float = 60.0
    workers: int = 4  # requests in flight

    @classmethod
    def resolve(cls, base_url: str | None = None, model: str | None = None,
                api_key: str | None = None, **options) -> LLMSettings:
        """Fills base URL, model and key from the environment where not given.

        Args:
          base_url: e.g. "http://localhost:8000/v1" (else CACOPHONY_LLM_BASE_URL).
          model: the served model name (else CACOPHONY_LLM_MODEL).
          api_key: sent as "Authorization: Bearer ..." (else CACOPHONY_LLM_API_KEY;
            may stay empty for local servers).
          **options: the other fields (temperature, workers, max_retries, ...).

        Returns:
          The settings.

        Raises:
          LLMConfigError: no base URL or model, a URL that is not http(s), or an
            unknown option.
        """
        base_url = (base_url or os.environ.get(ENV_BASE_URL, "")).strip().rstrip("/")
        model = (model or os.environ.get(ENV_MODEL, "")).strip()
        api_key = api_key if api_key is not None else os.environ.get(ENV_API_KEY, "")
        if not base_url:
            raise LLMConfigError(f"the LLM backend needs a server: pass base_url (--base-url) "
                                 f"or set {ENV_BASE_URL}, e.g. http://localhost:8000/v1")
        if not re.match(r"https?://", base_url):
            raise LLMConfigError(f"LLM base URL {base_url!r} must start with http:// or https://")
        if not model:
            raise LLMConfigError(f"the LLM backend needs a model name: pass model (--model) "
                                 f"or set {ENV_MODEL}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LLMConfigError(f"unknown LLM option(s) {unknown}; known: {sorted(known)}")
        settings = cls(base_url=base_url, model=model, api_key=api_key.strip(), **options)
        for name, flag, ok, need in (
                ("workers", "--workers", settings.workers >= 1, "at least 1"),
                ("max_retries", "--max-retries", settings.max_retries >= 0, "at least 0"),
                ("timeout_s", "--timeout", settings.timeout_s > 0, "positive"),
                ("temperature", "--temperature", 0 <= settings.temperature <= 2, "in [0, 2]"),
                ("max_tokens", "max_tokens", settings.max_tokens >= 1, "at least 1")):
            if not ok:  # NaN fails every comparison, so it is refused too
                raise LLMConfigError(f"{name} ({flag}) must be {need}, got "
                                     f"{getattr(settings, name)}")
        return settings


def user_message(title: str, tags: list[str] | str | None, description: str) -> str:
    """The metadata of one clip as the user turn (links, e-mails, handles removed).

    Args:
      title: clip title.
      tags: list or comma-separated string.
      description: free text (cut to its first 1,500 characters; the title to 300 and
        the tags to 600).

    Returns:
      "Title: ...\\nTags: ...\\nDescription: ..." text.
    """
    tag_list = tags if isinstance(tags, list) else [t for t in (tags or "").split(",")]
    tag_text = ", ".join(t for t in (rules_text.scrub(str(t)) for t in tag_list) if t)
    desc = rules_text.scrub(description)[:_DESCRIPTION_CHARS]
    return (f"Title: {rules_text.scrub(title)[:_TITLE_CHARS]}\nTags: {tag_text[:_TAGS_CHARS]}\n"
            f"Description: {desc}")


# A chat model's courtesy words before the answer ("Sure! Here is the caption: ...").
_PREAMBLE = re.compile(r"^(?:(?:sure|certainly|of course|okay|ok)[!.,:]\s*)?"
                       r"(?:here(?:'s| is) (?:the |a |your )?(?:\w+ )?caption\b[^:]*:\s*)?",
                       re.I)
_REFUSAL = re.compile(r"(?:i(?:'m| am) (?:sorry|unable|not able)|i can(?:not|'t| not)\b|"
                      r"sorry[,.!]|as an ai\b|unfortunately,)", re.I)


def parse_caption(text: str) -> str | None:
    """The caption in a model's answer, or None for NONE / an empty answer.

    Args:
      text: `choices[0].message.content`.

    Returns:
      The first line after any courtesy line ("Sure! Here is the caption:"), without
      labels, bullets or quotes, whitespace collapsed.

    Raises:
      RejectedError: a refusal, or an answer too long to be the one sentence asked for.
    """
    text = re.sub(r"<think>.*?</think>", "", text or "", flags=re.S)  # reasoning models
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    while len(lines) > 1 and lines[0].endswith(":"):
        lines.pop(0)  # "Here is the caption:", the caption on the next line
    line = _PREAMBLE.sub("", lines[0] if lines else "", count=1)
    if not line.strip() and len(lines) > 1:
        line = lines[1]  # "Sure!" alone, the caption on the next line
    line = re.sub(r"^(?:caption\s*:|[-*\u2022]|\d+[.)])\s*", "", line, flags=re.I)
    line = re.sub(r"\s+", " ", line.strip().strip("\"'`\u201c\u201d\u2018\u2019").strip())
    if not line or re.fullmatch(r"none\W*", line, flags=re.I):
        return None
    if _REFUSAL.match(line):
        raise RejectedError(f"the model declined: {line[:80]!r}")
    if len(line) > _CAPTION_CHARS:
        raise RejectedError(f"the answer is {len(line)} characters long, not one short caption")
    return line[0].upper() + line[1:]


def _too_long(code: int, detail: str) -> bool:
    """Whether an HTTP error refuses this one request for its length (the clip is
    skipped) rather than every request (the run stops)."""
    return code in (400, 413, 422) and bool(re.search(
        r"context|too long|too many tokens|maximum .*tokens|token limit|exceeds", detail, re.I))


class ChatClient:
    """Sends chat-completion requests with retries; counts HTTP attempts."""

    def __init__(self, settings: LLMSettings):
        self.settings = settings
        self.url = settings.base_url + "/chat/completions"
        self.attempts = 0
        self._lock = threading.Lock()

    def _redact(self, text: str) -> str:
        key = self.settings.api_key
        return text.replace(key, "[redacted]") if key else text

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.attempts += 1
        with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def complete(self, messages: list[dict[str, str]]) -> str:
        """One chat completion; retries connection errors, 429 and 5xx with backoff.

        Args:
          messages: OpenAI-style [{"role": ..., "content": ...}].

        Returns:
          `choices[0].message.content`.

        Raises:
          RejectedError: the server refused this request as too long.
          LLMError: another 4xx than 429, an answer without that field, or the last
            retry failed.
        """
        s = self.settings
        body = json.dumps({"model": s.model, "messages": messages,
                           "temperature": s.temperature, "max_tokens": s.max_tokens}).encode()
        last, wait = "", 0.0
        for attempt in range(s.max_retries + 1):
            if attempt:
                time.sleep(min(s.max_backoff_s, max(wait, s.backoff_s * 2 ** (attempt - 1))))
            wait = 0.0
            try:
                payload = self._post(body)
            except urllib.error.HTTPError as e:
                detail = self._redact(e.read().decode("utf-8", "replace")[:300].strip())
                if e.code == 429 or e.code >= 500:
                    last = f"HTTP {e.code} {detail}".strip()
                    retry_after = e.headers.get("Retry-After", "") if e.headers else ""
                    wait = float(retry_after) if retry_after.isdigit() else 0.0
                    continue
                if _too_long(e.code, detail):
                    raise RejectedError(f"the server refused it as too long (HTTP {e.code}: "
                                   f"{detail[:120]})") from None
                hint = (f"check {ENV_API_KEY}" if e.code in (401, 403) else
                        "check the base URL (most servers want .../v1) and the model name")
                raise LLMError(f"LLM server {self.url} refused the request (HTTP {e.code}: "
                               f"{detail or e.reason}); {hint}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError,
                    json.JSONDecodeError) as e:
                last = self._redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
                continue
            try:
                content = payload["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                content = None
            if not isinstance(content, str):
                raise LLMError(f"LLM server {self.url} answered without "
                               "choices[0].message.content; is it OpenAI-compatible?")
            return content
        tries = s.max_retries + 1
        raise LLMError(f"LLM server {self.url} failed {tries} time{'s' * (tries > 1)} (last: "
                       f"{last}); rows written so far are kept: rerun the same command to "
                       "resume")


class CaptionCache:
    """sqlite3 file: request hash -> caption (NULL when the model said NONE)."""

    def __init__(self, path: str):
        try:
            self._db = sqlite3.connect(path)
            self._db.execute("CREATE TABLE IF NOT EXISTS captions "
                             "(key TEXT PRIMARY KEY, model TEXT, caption TEXT)")
        except sqlite3.Error as e:
            raise LLMConfigError(f"cannot open the LLM cache {path}: {e}; pass another "
                                 "cache path or delete the file") from e

    @staticmethod
    def key(model: str, system_prompt: str, user: str, temperature: float = 0.0) -> str:
        """The cache key of one request; a sampled answer (temperature > 0) is keyed by
        its temperature too (at 0 the key is the one earlier versions used)."""
        parts = [model, system_prompt, user] + ([float(temperature)] if temperature else [])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def get(self, key: str) -> tuple[bool, str | None]:
        """(found, caption)."""
        row = self._db.execute("SELECT caption FROM captions WHERE key = ?", (key,)).fetchone()
        return (row is not None, row[0] if row else None)

    def put(self, entries: list[tuple[str, str, str | None]]) -> None:
        """Stores (key, model, caption) entries and commits."""
        self._db.executemany("INSERT OR REPLACE INTO captions VALUES (?, ?, ?)", entries)
        self._db.commit()

    def close(self) -> None:
        self._db.close()


class LLMCaptioner:
    """Captions clips through the chat API, answering repeats from the cache."""

    def __init__(self, settings: LLMSettings, cache_path: str,
                 system_prompt: str = SYSTEM_PROMPT):
        self.settings = settings
        self.system_prompt = system_prompt
        self.client = ChatClient(settings)
        self.cache = CaptionCache(cache_path)
        self.cached = 0  # clips answered from the cache
        self.requested = 0  # clips sent to the server

    def _ask(self, user: str) -> str | None:
        return parse_caption(self.client.complete([
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": user}]))

    def caption_many(self, clips: list[tuple[str, list[str] | str | None, str]]
                     ) -> list[str | None | RejectedError]:
        """Captions (title, tags, description) triples, in order.

        Args:
          clips: the metadata of each clip.

        Returns:
          One caption per clip: None for "nothing audible", a `RejectedError` where that
          clip's request or answer gave none (not cached: a rerun asks again).

        Raises:
          LLMError: a request failed for good. Every answer is cached as it arrives,
            so neither this nor an interruption (Ctrl-C) loses answers received.
        """
        users = [user_message(*clip) for clip in clips]
        keys = [CaptionCache.key(self.settings.model, self.system_prompt, u,
                                 self.settings.temperature) for u in users]
        answers: dict[str, str | None] = {}
        todo: dict[str, str] = {}
        for key, user in zip(keys, users, strict=True):
            found, caption = self.cache.get(key)
            if found:
                answers[key] = caption
                self.cached += 1
            elif key not in todo:
                todo[key] = user
        error = None
        pool = concurrent.futures.ThreadPoolExecutor(self.settings.workers)
        futures = {pool.submit(self._ask, user): key for key, user in todo.items()}
        try:
            for future in concurrent.futures.as_completed(futures):
                if future.cancelled():
                    continue
                self.requested += 1
                key = futures[future]
                try:
                    answers[key] = future.result()
                except RejectedError as e:
                    answers[key] = e
                    continue
                except LLMError as e:
                    if error is None:  # stop early: the server is down or refusing
                        error = e
                        for other in futures:
                            other.cancel()
                    continue
                self.cache.put([(key, self.settings.model, answers[key])])
        except BaseException:
            # Ctrl-C: drop the queued requests; only those in flight are waited for.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        if error is not None:
            raise error
        return [answers[key] for key in keys]

    def close(self) -> None:
        self.cache.close()
