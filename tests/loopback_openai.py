"""A loopback OpenAI-compatible HTTP server for tests and benchmarks (stdlib only, 127.0.0.1, port 0).

Serves what safe_jax.text.subjects uses: chat completions, file upload (multipart) and download, batch
create and retrieve. It counts every request, records what it was sent, tracks how many requests
were in flight at once, and can be scripted per request (``plan``) to answer 429, 500, slowly, or
with a malformed body.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    """A scripted answer: an error status (with headers), a slow answer, or a chosen content."""

    status: int = 200
    message: str = "scripted error"
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    content: str | None = None      # for status 200: the assistant message (default: the answer)


def default_answer(caption: str) -> str:
    """The first word of the caption, which is always verbatim."""
    return json.dumps({"subjects": [caption.split()[0].strip(".,")]})


class LoopbackOpenAI:
    def __init__(self, answer: Callable[[str], str] = default_answer,
                 plan: Callable[[int, str], Reply | None] | None = None, delay: float = 0.0,
                 batch_polls: int = 2, batch_plan: Callable[[str], Reply | None] | None = None,
                 expect_key: str | None = None):
        self.answer, self.plan, self.delay = answer, plan, delay
        self.batch_polls, self.batch_plan, self.expect_key = batch_polls, batch_plan, expect_key
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.chat_bodies: list[dict] = []
        self.auth: set[str] = set()
        self.uploads: list[dict] = []
        self.batch_creates: list[dict] = []
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.active = self.max_active = 0
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None

    # --------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def chat_count(self) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if p.endswith("/chat/completions"))

    def __enter__(self) -> "LoopbackOpenAI":
        owner = self

        class Handler(_Handler):
            server_state = owner

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # --------------------------------------------------------------- responses
    def completion(self, caption: str, content: str | None = None) -> dict:
        return {
            "id": self.new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": "loopback",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": self.answer(caption) if content is None else content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }

    def run_batch(self, batch: dict) -> None:
        """Answer every line of a batch's input file, as the real service would when it completes."""
        out, err = [], []
        for raw in self.files[batch["input_file_id"]]["data"].decode().splitlines():
            line = json.loads(raw)
            caption = caption_of(line["body"])
            reply = self.batch_plan(caption) if self.batch_plan else None
            if reply is not None and reply.status != 200:
                err.append({"id": self.new_id("batch_req"), "custom_id": line["custom_id"], "error": None,
                            "response": {"status_code": reply.status, "request_id": "r",
                                         "body": {"error": {"message": reply.message, "type": "server_error"}}}})
            else:
                content = reply.content if reply is not None else None
                out.append({"id": self.new_id("batch_req"), "custom_id": line["custom_id"], "error": None,
                            "response": {"status_code": 200, "request_id": "r",
                                         "body": self.completion(caption, content)}})
        for name, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                fid = self.new_id("file")
                self.files[fid] = {"purpose": "batch_output", "filename": f"{name}.jsonl",
                                   "data": "".join(json.dumps(x) + "\n" for x in lines).encode()}
                batch[name] = fid
        batch["status"] = "completed"
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out and left
            super().handle_error(request, client_address)


def caption_of(body: dict) -> str:
    text = body["messages"][-1]["content"]
    return text[len("Caption: "):] if text.startswith("Caption: ") else text


def _file_object(fid: str, f: dict) -> dict:
    return {"id": fid, "object": "file", "bytes": len(f["data"]), "created_at": int(time.time()),
            "filename": f["filename"], "purpose": f["purpose"], "status": "processed"}


def _batch_object(b: dict) -> dict:
    return {k: v for k, v in b.items() if k != "polls"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: LoopbackOpenAI

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, obj: dict | bytes, headers: dict[str, str] | None = None) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(obj, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None, headers=None) -> None:
        self._send(status, {"error": {"message": message, "type": "error", "code": code}}, headers)

    def _enter(self, method: str) -> bytes:
        s = self.server_state
        body = self._body()
        with s.lock:
            s.requests.append((method, self.path))
            s.auth.add(self.headers.get("Authorization", ""))
            s.active += 1
            s.max_active = max(s.max_active, s.active)
        return body

    def _leave(self) -> None:
        with self.server_state.lock:
            self.server_state.active -= 1

    def do_POST(self) -> None:
        body = self._enter("POST")
        try:
            self._post(body)
        finally:
            self._leave()

    def do_GET(self) -> None:
        self._enter("GET")
        try:
            self._get()
        finally:
            self._leave()

    def _authorised(self) -> bool:
        s = self.server_state
        given = self.headers.get("Authorization", "")
        if s.expect_key is not None and given != f"Bearer {s.expect_key}":
            # Like some servers, echo what was sent: the client must not repeat it anywhere.
            self._error(401, f"Incorrect API key provided: {given.removeprefix('Bearer ')}", "invalid_api_key")
            return False
        return True

    def _post(self, raw: bytes) -> None:
        s = self.server_state
        if not self._authorised():
            return
        if self.path.endswith("/chat/completions"):
            body = json.loads(raw)
            caption = caption_of(body)
            with s.lock:
                s.chat_bodies.append(body)
                n = len(s.chat_bodies)
            reply = s.plan(n, caption) if s.plan else None
            delay = s.delay + (reply.delay if reply else 0.0)
            if delay:
                time.sleep(delay)
            if reply is not None and reply.status != 200:
                self._error(reply.status, reply.message, reply.code, reply.headers)
            else:
                self._send(200, s.completion(caption, reply.content if reply else None))
        elif self.path.endswith("/files"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
            fields = {}
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                fields[name] = (part.get_filename(), part.get_payload(decode=True))
            fid = s.new_id("file")
            f = {"purpose": fields["purpose"][1].decode(), "filename": fields["file"][0], "data": fields["file"][1]}
            with s.lock:
                s.files[fid] = f
                s.uploads.append(dict(f, id=fid))
            self._send(200, _file_object(fid, f))
        elif self.path.endswith("/batches"):
            req = json.loads(raw)
            bid = s.new_id("batch")
            b = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "input_file_id": req["input_file_id"],
                 "completion_window": req["completion_window"], "status": "validating",
                 "created_at": int(time.time()), "metadata": req.get("metadata"), "output_file_id": None,
                 "error_file_id": None, "polls": 0, "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            with s.lock:
                s.batch_creates.append(req)
                s.batches[bid] = b
            self._send(200, _batch_object(b))
        else:
            self._error(404, f"no route {self.path}")

    def _get(self) -> None:
        s = self.server_state
        if not self._authorised():
            return
        parts = self.path.split("?")[0].strip("/").split("/")  # v1, batches, id / v1, files, id, content
        if len(parts) == 3 and parts[1] == "batches" and parts[2] in s.batches:
            with s.lock:
                b = s.batches[parts[2]]
                b["polls"] += 1
                if b["status"] != "completed":
                    if b["polls"] <= s.batch_polls:
                        total = len(s.files[b["input_file_id"]]["data"].splitlines())
                        b["status"] = "in_progress"
                        b["request_counts"] = {"total": total, "completed": total * (b["polls"] - 1) // s.batch_polls,
                                               "failed": 0}
                    else:
                        s.run_batch(b)
                obj = _batch_object(b)
            self._send(200, obj)
        elif len(parts) == 4 and parts[1] == "files" and parts[3] == "content" and parts[2] in s.files:
            self._send(200, s.files[parts[2]]["data"])
        elif len(parts) == 3 and parts[1] == "files" and parts[2] in s.files:
            self._send(200, _file_object(parts[2], s.files[parts[2]]))
        else:
            self._error(404, f"no route {self.path}")
