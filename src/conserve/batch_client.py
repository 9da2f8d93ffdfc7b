"""`conserve batch FILE.jsonl`: run a file of requests through a server's Batch API and save the results.

Uploads FILE (purpose "batch"), creates the batch, shows progress on stderr until it ends, then writes
the output file (successful requests) and the error file (failed ones, only if there are any).
Exit status: 0 when the batch completed (even if some lines failed: they are in the error file),
1 when it failed, expired or was cancelled (partial results are still written), 2 when the server
could not be used, 130 on Ctrl-C, which cancels the batch on the server first.

Only httpx is needed; it speaks plain OpenAI HTTP, so any OpenAI-compatible server works.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import httpx

TERMINAL = ("completed", "failed", "expired", "cancelled")


class ClientError(Exception):
    """The server could not be reached or refused a request; the message is one line for the user."""


def add_batch_command(subparsers) -> None:
    p = subparsers.add_parser("batch", help="run a JSONL file of requests through the server's Batch API",
                              description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("file", help="input JSONL: one {custom_id, method, url, body} request per line")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    p.add_argument("--endpoint", default="/v1/chat/completions",
                   help="endpoint of every line: /v1/chat/completions or /v1/completions (default: %(default)s)")
    p.add_argument("--output", default=None, help="successful results (default: FILE with .output.jsonl)")
    p.add_argument("--errors", default=None, help="failed requests (default: FILE with .errors.jsonl)")
    p.add_argument("--api-key", default=os.environ.get("CONSERVE_API_KEY"),
                   help="bearer token (default: $CONSERVE_API_KEY)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between status checks (default: %(default)s)")
    p.set_defaults(func=run_batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conserve")
    add_batch_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def run_batch(args: argparse.Namespace) -> int:
    src = Path(args.file)
    out = Path(args.output) if args.output else _sibling(src, ".output.jsonl")
    err = Path(args.errors) if args.errors else _sibling(src, ".errors.jsonl")
    if not src.is_file():
        return _fail(f"no such file: {src}", 2)
    api = _Api(args.url, args.api_key)
    batch: dict | None = None
    progress = _Progress(sys.stderr)
    try:
        file_id = api.upload(src)
        batch = api.create_batch(file_id, args.endpoint)
        while batch["status"] not in TERMINAL:
            progress.show(batch)
            time.sleep(max(args.poll, 0.01))
            batch = api.get_batch(batch["id"])
        progress.show(batch)
        progress.end()
        wrote = _save(api, batch, out, err)
    except KeyboardInterrupt:
        progress.end()
        if batch is None:
            return _fail("interrupted", 130)
        try:
            api.cancel_batch(batch["id"])
        except (ClientError, httpx.HTTPError) as e:
            return _fail(f"interrupted; cancelling batch {batch['id']} failed: {e}", 130)
        return _fail(f"interrupted; batch {batch['id']} is being cancelled on the server", 130)
    except ClientError as e:
        progress.end()
        return _fail(str(e), 2)
    finally:
        api.close()
    counts = batch.get("request_counts") or {}
    summary = (f"batch {batch['id']} {batch['status']}: {counts.get('completed', 0)} succeeded, "
               f"{counts.get('failed', 0)} failed of {counts.get('total', 0)}; " + ", ".join(wrote))
    if batch["status"] == "completed":
        print(f"conserve batch: {summary}", file=sys.stderr)
        return 0
    reason = "; ".join(e.get("message", "") for e in ((batch.get("errors") or {}).get("data") or [])[:3])
    return _fail(f"{summary}" + (f" ({reason})" if reason else ""), 1)


def _save(api: _Api, batch: dict, out: Path, err: Path) -> list[str]:
    """Download the output file (always written, maybe empty) and the error file (if any)."""
    wrote = []
    if batch.get("output_file_id"):
        api.download(batch["output_file_id"], out)
    else:
        out.write_bytes(b"")
    wrote.append(f"results in {out}")
    if batch.get("error_file_id"):
        api.download(batch["error_file_id"], err)
        wrote.append(f"errors in {err}")
    return wrote


def _sibling(src: Path, suffix: str) -> Path:
    stem = src.name.removesuffix(".jsonl")
    return src.with_name(stem + suffix)


def _fail(message: str, code: int) -> int:
    print(f"conserve batch: {message}", file=sys.stderr)
    return code


class _Api:
    def __init__(self, url: str, api_key: str | None) -> None:
        base = url.rstrip("/")
        base = base.removesuffix("/v1")  # accept both http://host:port and .../v1
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(60.0, connect=10.0))
        self._url = base

    def close(self) -> None:
        self._http.close()

    def upload(self, path: Path) -> str:
        with open(path, "rb") as f:  # httpx streams the file part; it is never read whole
            return self._call("POST", "/v1/files", data={"purpose": "batch"},
                              files={"file": (path.name, f, "application/jsonl")})["id"]

    def create_batch(self, file_id: str, endpoint: str) -> dict:
        return self._call("POST", "/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint,
                                                        "completion_window": "24h"})

    def get_batch(self, batch_id: str) -> dict:
        return self._call("GET", f"/v1/batches/{batch_id}")

    def cancel_batch(self, batch_id: str) -> dict:
        return self._call("POST", f"/v1/batches/{batch_id}/cancel")

    def download(self, file_id: str, dest: Path) -> None:
        tmp = dest.with_name(dest.name + ".part")
        try:
            with self._http.stream("GET", f"/v1/files/{file_id}/content") as r:
                if r.status_code != 200:
                    r.read()
                    raise ClientError(f"downloading {file_id} failed: {_error_message(r)}")
                with open(tmp, "wb") as f:
                    f.writelines(r.iter_bytes())
            os.replace(tmp, dest)  # never leave a half-written result under the final name
        except httpx.HTTPError as e:
            raise ClientError(f"downloading {file_id} from {self._url} failed: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {self._url}: {e}") from None
        if r.status_code >= 400:
            raise ClientError(f"{method} {path} failed: {_error_message(r)}")
        return r.json()


def _error_message(r: httpx.Response) -> str:
    try:
        return f"{r.status_code} {r.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} {r.text[:200]}"


class _Progress:
    """A one-line bar on a terminal; on a pipe, a plain line whenever the status changes or every 10 s."""

    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._start: tuple[float, int] | None = None  # (time, done) when the batch was first seen running
        self._last: tuple[str, float] = ("", 0.0)
        self._drawn = False

    def show(self, batch: dict) -> None:
        counts = batch.get("request_counts") or {}
        total, ok, bad = counts.get("total", 0), counts.get("completed", 0), counts.get("failed", 0)
        done, status, now = ok + bad, batch["status"], time.monotonic()
        if status == "in_progress" and self._start is None:
            self._start = (now, done)
        rate = 0.0
        if self._start is not None and now > self._start[0]:
            rate = (done - self._start[1]) / (now - self._start[0])
        eta = _duration((total - done) / rate) if rate > 0 and status == "in_progress" else "--"
        if self.tty:
            width = 24
            filled = int(width * done / total) if total else 0
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{status:<11} [{bar}] {done}/{total} ({bad} failed)  {rate:.1f} req/s  "
                              f"ETA {eta}\x1b[K")
            self.stream.flush()
            self._drawn = True
            return
        last_status, last_at = self._last
        if status != last_status or now - last_at >= 10.0:
            print(f"{status}: {done}/{total} done ({ok} succeeded, {bad} failed), {rate:.1f} req/s, ETA {eta}",
                  file=self.stream, flush=True)
            self._last = (status, now)

    def end(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
