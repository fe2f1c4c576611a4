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
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..data import numbered_jsonl, read_text
from ..infra.files import complete_lines, locked, writing
from .benchmark_files import BenchmarkError, a_text, read_json

PROMPTS = Path(__file__).parent / "judge_prompts"


class JudgeError(RuntimeError):
    """The judge did not give a usable reply, even after retries."""


PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
# LLaVA's llava/eval/eval_gpt_review_bench.py (lines 17-20 and 98-102): its system message, and the
# review it builds around rule.json's per-category prompt and role.
LLAVA_REVIEW_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_REVIEW_LAYOUT = ("[Context]\n{context}\n\n[Question]\n{question}\n\n[ROLE 1]\n{answer_1}\n\n[End of ROLE 1]\n\n"
                       "[ROLE 2]\n{answer_2}\n\n[End of ROLE 2]\n\n[System]\nPROMPT\n\n")


@dataclass
class JudgePrompt:
    """What a judge is sent: an optional system message and a user-message template with {name}
    placeholders ("{{" and "}}" are literal braces, as in Python's str.format)."""

    name: str
    template: str
    system: str | None
    version: str  # the name plus a digest of the text: an edited prompt never reuses cached judgments

    @property
    def placeholders(self) -> set[str]:
        return {m.group(1) for m in PLACEHOLDER.finditer(self.template) if m.group(1)}

    def fill(self, **fields) -> str:
        """Every placeholder replaced in one pass over the template, so a value that itself contains
        "{reference}" is sent as written. A placeholder with no value is an error (raised while the
        requests are being made ready, before any is sent)."""
        missing = self.placeholders - set(fields)
        if missing:
            raise ValueError(f"judge prompt {self.name}: no value for placeholder(s) {sorted(missing)} "
                             f"(this benchmark fills {sorted(fields)})")
        return PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]) if m.group(1) else m.group(0)[0], self.template)


def _version(name: str, *texts) -> str:
    return f"{name}-{hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:8]}"


def _literal(text: str) -> str:
    """Text put inside a template as it is: its braces doubled, so they are never read as placeholders."""
    return text.replace("{", "{{").replace("}", "}}")


def read_prompt(source: str | None, name: str) -> JudgePrompt:
    """The judge prompt `name` from `source`:
    - None: ours, tinyalign/judge_prompts/<name>.txt (written for this project);
    - FastChat's `judge_prompts.jsonl`: the record whose "name" is `name` (e.g. "single-math-v1"), its
      system_prompt and prompt_template as they are;
    - LLaVA's `rule.json`: the entry `name` (e.g. "llava_bench_conv"), in the review layout and with
      the system message of LLaVA's eval_gpt_review_bench.py;
    - any other file: its whole text is the template (no system message)."""
    if source is None:
        path = PROMPTS / f"{name}.txt"
        if not path.exists():
            raise FileNotFoundError(f"judge prompt {name!r}: not one of ours ({sorted(p.stem for p in PROMPTS.glob('*.txt'))})")
        text = path.read_text()
        return JudgePrompt(name, text, None, _version(name, text))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"--judge-prompt {path}: file not found")
    if path.suffix == ".jsonl":
        records = numbered_jsonl(path, error=BenchmarkError)
        found = [(n, r) for n, r in records if r.get("name") == name]
        if not found:
            raise ValueError(f"{path}: no judge prompt named {name!r} (it has {[r.get('name') for _, r in records]})")
        n, r = found[0]
        template = a_text(r.get("prompt_template"), f"{path} line {n}", "prompt_template")
        system = r.get("system_prompt") and a_text(r["system_prompt"], f"{path} line {n}", "system_prompt")
        return JudgePrompt(f"{path.name}:{name}", template, system, _version(name, system, template))
    if path.suffix == ".json":
        rules = read_json(path)
        if not isinstance(rules, dict) or name not in rules:
            raise ValueError(f"{path}: no rule named {name!r} (it has {sorted(rules) if isinstance(rules, dict) else []})")
        rule = rules[name]
        if not isinstance(rule, dict):
            raise ValueError(f"{path}: rule {name!r} must be an object {{role, prompt}}, got {rule!r:.80}")
        role = _literal(a_text(rule.get("role"), f"{path} rule {name!r}", "role"))
        prompt = _literal(a_text(rule.get("prompt"), f"{path} rule {name!r}", "prompt"))
        template = LLAVA_REVIEW_LAYOUT.replace("ROLE", role).replace("PROMPT", prompt)
        return JudgePrompt(f"{path.name}:{name}", template, LLAVA_REVIEW_SYSTEM,
                           _version(name, LLAVA_REVIEW_SYSTEM, template))
    text = read_text(path, BenchmarkError)
    return JudgePrompt(path.name, text, None, _version(path.stem, text))


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
        content = reply["choices"][0]["message"]["content"]
        if not isinstance(content, str):  # a refusal or a tool call: nothing to grade with
            raise ValueError(f"the reply holds no text (content: {content!r})")
        return content

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
    """Judgments on disk, one JSON line each (the judge's raw reply with what it was parsed to),
    appended (and fsynced) as they arrive.

    Several processes may share one cache (two eval.py runs, say): the first usable verdict written
    for a key stands, for all of them and for every rerun. A cached reply is parsed again by the rule
    in force when it is read, so a reply an older rule accepted (a rating outside its scale) is not
    used; its replacement is appended after it. Before asking the judge, a miss re-reads what others
    appended meanwhile; a verdict arriving for a key that someone wrote first is dropped in favour of
    that one (two processes asking at the very same moment may both pay for the call, but they score
    with the same verdict)."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.entries = {}  # key -> every entry written for it, in the file's order
        self.offset = 0  # bytes of the file read so far
        self.hits = 0
        self.refresh()

    def refresh(self) -> None:
        """Take in the lines appended since the last read, by this process or another."""
        lines, self.offset = complete_lines(self.path, self.offset, skip_bad=True)
        for line in lines:
            try:
                entry = json.loads(line)
                self.entries.setdefault(entry["key"], []).append(entry)
            except (json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError):
                pass  # a line torn by a crash: that judgment is simply asked again

    def usable(self, key: str, parse):
        """The first entry of `key` whose reply `parse` accepts, with its value parsed now; or None."""
        for entry in self.entries.get(key, []):
            try:
                return {**entry, "value": parse(entry["reply"])}
            except (ValueError, TypeError, AttributeError, KeyError):
                continue
        return None

    @staticmethod
    def key(judge_model: str, prompt_version: str, prompt, answer: str) -> str:
        return hashlib.sha256(json.dumps([judge_model, prompt_version, prompt, answer]).encode()).hexdigest()

    def get(self, key: str, parse):
        with self.lock:
            entry = self.usable(key, parse)
            if entry is None:
                self.refresh()  # judged by another process meanwhile?
                entry = self.usable(key, parse)
            if entry is not None:
                self.hits += 1
        return entry

    def put(self, key: str, value, reply: str, judge_model: str, prompt_version: str, parse) -> dict:
        """Append a verdict, unless a usable one for this key was written first (then that one is returned)."""
        entry = {"key": key, "value": value, "reply": reply, "judge": judge_model, "prompt_version": prompt_version}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock, locked(self.path.with_name(self.path.name + ".lock")):
            self.refresh()
            first = self.usable(key, parse)
            if first is not None:
                return first
            with writing(self.path), self.path.open("a+b") as f:
                if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                    f.write(b"\n")  # end a line torn by a crash, so that ours is not glued to it
                f.write((json.dumps(entry) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
                self.offset = f.tell()  # read up to here: the file is locked, the last line is ours
            self.entries.setdefault(key, []).append(entry)
        return entry


def request(prompt: JudgePrompt, graded: str, item_id, images=(), /, **fields) -> dict:
    """One item to judge: the prompt filled with `fields` (any placeholder error raised now, before
    anything is sent) and the text graded (part of the cache key)."""
    return {"id": item_id, "system": prompt.system, "prompt": prompt.fill(**fields), "version": prompt.version,
            "answer": graded, "images": list(images)}


class Judge:
    """A chat client + a cache: `judge_all` grades many requests with bounded concurrency."""

    def __init__(self, client: ChatClient, cache_path, workers: int = 4):
        self.client = client
        self.cache = JudgmentCache(cache_path)
        self.workers = workers

    def info(self, *prompts: JudgePrompt) -> dict:
        """What every result file records about how it was judged."""
        return {"judge_model": self.client.model, "prompts": {p.name: p.version for p in prompts}}

    def judge_all(self, items: list[dict], parse: Callable[[str], object], desc: str = "judging") -> list[dict]:
        """items: from `request`. -> one {"value", "reply"} or {"error"} per item, in order."""
        def one(item):
            key = self.cache.key(self.client.model, item["version"], [item["system"], item["prompt"]], item["answer"])
            hit = self.cache.get(key, parse)
            if hit is not None:
                return hit
            images = item.get("images", [])
            content = ([{"type": "text", "text": item["prompt"]}] + [image_part(p) for p in images]
                       if images else item["prompt"])  # plain text for text-only judges
            messages = ([{"role": "system", "content": item["system"]}] if item["system"] else []) + \
                [{"role": "user", "content": content}]
            try:
                value, reply = self.client.ask(messages, parse)
            except JudgeError as e:
                return {"error": str(e)}
            return self.cache.put(key, value, reply, self.client.model, item["version"], parse)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(tqdm(pool.map(one, items), total=len(items), desc=desc, unit="item"))
