"""A model as judge: any OpenAI-compatible chat-completions endpoint, with retries and a disk cache.

Used by the annotator (ratings of sampled answers) and by eval.py (MM-Vet, LLaVA-Bench, MT-Bench,
AlpacaEval grading). Three rules make judged numbers trustworthy and cheap to reproduce:
- temperature 0, and the judge model and prompt version written next to every score;
- a reply that does not parse is a failed try, retried with backoff like an HTTP error, and after the
  last try the item is reported as failed, never scored as zero;
- every parsed judgment is cached on disk under (judge model, prompt version, prompt, answer): a rerun
  asks the judge nothing it has answered before, so it costs nothing and gives the same score.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from tqdm import tqdm

PROMPTS = Path(__file__).parent / "judge_prompts"


class JudgeError(RuntimeError):
    """The judge did not give a usable reply, even after retries."""


def read_prompt(name_or_path: str) -> tuple[str, str]:
    """A judge prompt file -> (text, version). Ours live in tinyalign/judge_prompts/ (by name); a user
    may pass any file (e.g. the benchmark's own prompt). The version is the file name plus a digest of
    its text, so an edited prompt never reuses judgments cached for the old one."""
    path = Path(name_or_path)
    if not path.exists():
        path = PROMPTS / f"{name_or_path}.txt"
    if not path.exists():
        raise FileNotFoundError(f"judge prompt {name_or_path!r}: no such file (ours: {sorted(p.stem for p in PROMPTS.glob('*.txt'))})")
    text = path.read_text()
    return text, f"{path.stem}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def image_part(path) -> dict:
    """An image as an inline data URL, the way chat-completions APIs take it."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    kind = "jpeg" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "png"
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{data}"}}


class ChatClient:
    """POST /chat/completions at temperature 0; `ask` retries failures (including unparsable replies)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 2.0, max_tokens: int | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.backoff, self.max_tokens = retries, backoff, max_tokens
        self.calls = 0

    def complete(self, messages: list[dict]) -> str:
        body = {"model": self.model, "temperature": 0, "messages": messages}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        self.calls += 1
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            reply = json.loads(response.read())
        return reply["choices"][0]["message"]["content"]

    def ask(self, messages: list[dict], parse: Callable[[str], object]):
        """-> (parsed value, raw reply). Raises JudgeError listing every failed try."""
        problems = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))  # 1x, 2x, 4x ... the base delay
            try:
                reply = self.complete(messages)
                return parse(reply), reply
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, TypeError,
                    json.JSONDecodeError, ValueError, JudgeError) as e:
                problems.append(f"try {attempt + 1}: {type(e).__name__}: {e}")
        raise JudgeError("; ".join(problems))


class JudgmentCache:
    """Parsed judgments on disk, one JSON line each, appended (and fsynced) as they arrive."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.entries = {}
        if self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a crash: that judgment is simply asked again
        self.hits = 0

    @staticmethod
    def key(judge_model: str, prompt_version: str, prompt: str, answer: str) -> str:
        return hashlib.sha256(json.dumps([judge_model, prompt_version, prompt, answer]).encode()).hexdigest()

    def get(self, key: str):
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
        return entry

    def put(self, key: str, value, reply: str, judge_model: str, prompt_version: str) -> dict:
        entry = {"key": key, "value": value, "reply": reply, "judge": judge_model, "prompt_version": prompt_version}
        with self.lock:
            self.entries[key] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return entry


class Judge:
    """A chat client + a prompt file + a cache: `judge_all` grades many items with bounded concurrency."""

    def __init__(self, client: ChatClient, prompt: str, cache_path, workers: int = 4):
        self.client = client
        self.template, self.prompt_version = read_prompt(prompt)
        self.cache = JudgmentCache(cache_path)
        self.workers = workers

    @property
    def info(self) -> dict:
        """What every result file records about how it was judged."""
        return {"judge_model": self.client.model, "prompt_version": self.prompt_version}

    def fill(self, **fields: str) -> str:
        """The prompt with each {name} replaced (only the names given: other braces stay as they are)."""
        text = self.template
        for name, value in fields.items():
            text = text.replace("{" + name + "}", str(value))
        return text

    def judge_all(self, items: list[dict], parse: Callable[[str], object], desc: str = "judging") -> list[dict]:
        """items: {"prompt": the full text sent (fills the template), "answer": what is graded, "images"?}.
        -> one {"value", "reply"} or {"error"} per item, in order."""
        def one(item):
            key = self.cache.key(self.client.model, self.prompt_version, item["prompt"], item["answer"])
            hit = self.cache.get(key)
            if hit is not None:
                return hit
            images = item.get("images", [])
            content = ([{"type": "text", "text": item["prompt"]}] + [image_part(p) for p in images]
                       if images else item["prompt"])  # plain text for text-only judges
            try:
                value, reply = self.client.ask([{"role": "user", "content": content}], parse)
            except JudgeError as e:
                return {"error": str(e)}
            return self.cache.put(key, value, reply, self.client.model, self.prompt_version)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(tqdm(pool.map(one, items), total=len(items), desc=desc, unit="item"))
