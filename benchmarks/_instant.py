"""An OpenAI-compatible endpoint that answers at once: nginx with fixed replies, for measuring
the orchestrator alone.

Not a benchmark itself. ``instant_endpoint()`` starts Debian's nginx (``nginx-light``) on a free
loopback port with a config written to a temporary folder, and stops it on exit:

- ``POST /v1/chat/completions`` and ``/v1/completions``: one fixed reply (a valid answer of the
  ``choice`` list ``CHOICES``, ``finish_reason: stop``, usage), from nginx's ``return 200``;
- ``POST /v1/embeddings``: as many vectors as inputs (``input`` a string or a list), as float
  lists or, with ``encoding_format: base64``, as base64 of little-endian float32 (the same
  values), written by a small script in nginx's own JavaScript module (``libnginx-mod-http-js``);
  usage as vLLM gives it (one total for the request: here 1 token per 4 characters, at least 1
  per input);
- ``GET /v1/models`` (both served names), ``GET /version``, ``GET /health``;
- under the base URLs ``/status503/v1``, ``/status400/v1``, ``/notjson/v1``: replicas that always
  answer 503, 400 (an error body as vLLM's) or a body that is not JSON; ``/headers/v1`` answers
  the request's Authorization and Content-Type headers (for the client's tests).

One nginx worker process: on 2 cores the orchestrator gets the other. Nothing is logged per
request. The served names are ``CHAT`` and ``EMBED``; vectors have ``dimensions`` floats.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

CHAT, EMBED = "instant-chat", "instant-embed"
CHOICES = ["billing", "bug", "feature", "other"]
JS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")
DEBIAN_PACKAGES = "nginx-light libnginx-mod-http-js"

REFUSAL = "the request is not valid"
CHAT_REPLY = {"id": "chatcmpl-instant", "object": "chat.completion", "created": 0, "model": CHAT,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "bug"}, "logprobs": None,
                           "finish_reason": "stop", "stop_reason": None}],
              "usage": {"prompt_tokens": 31, "total_tokens": 32, "completion_tokens": 1}}
COMPLETION_REPLY = {"id": "cmpl-instant", "object": "text_completion", "created": 0, "model": CHAT,
                    "choices": [{"index": 0, "text": "bug", "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 31, "total_tokens": 32, "completion_tokens": 1}}

EMBED_JS = """
// The vector is built once (when nginx loads the script); each request only repeats it.
var DIM = %(dim)d;
// float32 values, as vLLM's are; as text each is the shortest form of its double value, as
// vLLM's (Python's) are, so replies have the size and parsing cost of vLLM's.
var f32 = new Float32Array(DIM);
for (var i = 0; i < DIM; i++) { f32[i] = (((i * 7919) %% 2000) - 1000) / 31622.7766; }
var parts = [];
for (var k = 0; k < DIM; k++) { parts.push(String(f32[k])); }
var VEC = '[' + parts.join(',') + ']';
var VEC64 = '"' + Buffer.from(f32.buffer).toString('base64') + '"';

function embeddings(r) {
    var body;
    try { body = JSON.parse(r.requestText); } catch (e) {
        r.return(400, '{"error":{"message":"body is not JSON","type":"BadRequestError","code":400}}');
        return;
    }
    var inputs = Array.isArray(body.input) ? body.input : [body.input];
    var vec = body.encoding_format === 'base64' ? VEC64 : VEC;
    var out = [];
    var tokens = 0;
    for (var j = 0; j < inputs.length; j++) {
        tokens += Math.max(1, Math.ceil(String(inputs[j]).length / 4));
        out.push('{"index":' + j + ',"object":"embedding","embedding":' + vec + '}');
    }
    r.headersOut['Content-Type'] = 'application/json';
    r.return(200, '{"id":"embd-instant","object":"list","created":0,"model":"%(model)s","data":[' + out.join(',')
             + '],"usage":{"prompt_tokens":' + tokens + ',"total_tokens":' + tokens + ',"completion_tokens":0}}');
}

export default {embeddings};
"""

NGINX_CONF = """
load_module %(js_module)s;
worker_processes 1;
pid %(prefix)s/nginx.pid;
error_log %(prefix)s/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_buffer_size 4m;
    client_max_body_size 16m;
    client_body_temp_path %(prefix)s/body;
    proxy_temp_path %(prefix)s/proxy;
    fastcgi_temp_path %(prefix)s/fastcgi;
    uwsgi_temp_path %(prefix)s/uwsgi;
    scgi_temp_path %(prefix)s/scgi;
    default_type application/json;
    js_import embed from %(prefix)s/embed.js;
    server {
        listen 127.0.0.1:%(port)d;
        location = /health { return 200 ''; }
        location = /version { return 200 '{"version":"instant-nginx"}'; }
        location = /v1/models { return 200 '%(models)s'; }
        location = /v1/chat/completions { return 200 '%(chat)s'; }
        location = /v1/completions { return 200 '%(completion)s'; }
        location = /v1/embeddings { js_content embed.embeddings; }
        # replicas that misbehave, for the client's tests: base URLs http://127.0.0.1:PORT/<name>/v1
        location /status503/ { return 503 '{"error":{"message":"busy","type":"ServiceUnavailable","code":503}}'; }
        location /status400/ { return 400 '{"error":{"message":"refused: %(refusal)s","type":"BadRequestError","code":400}}'; }
        location /notjson/ { return 200 'this is not JSON'; }
        location /close/ { keepalive_timeout 0; return 200 '%(chat)s'; }
        location /headers/ { return 200 '{"authorization":"$http_authorization","content_type":"$content_type"}'; }
    }
}
"""


def missing() -> str | None:
    """Why the endpoint cannot start here, or None."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return f"nginx is not installed: apt-get install -y {DEBIAN_PACKAGES}"
    if not JS_MODULE.exists():
        return f"nginx's JavaScript module is not installed ({JS_MODULE}): apt-get install -y {DEBIAN_PACKAGES}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nginx_json(obj: dict) -> str:
    """A reply inside nginx's single-quoted ``return`` string."""
    return json.dumps(obj, separators=(",", ":")).replace("\\", "\\\\").replace("'", "\\'")


@contextlib.contextmanager
def instant_endpoint(work: Path, dimensions: int = 384):
    """Start nginx on loopback; yield its base URL (``http://127.0.0.1:PORT/v1``); stop it on exit."""
    why = missing()
    if why:
        raise RuntimeError(why)
    prefix = work / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "embed.js").write_text(EMBED_JS % {"dim": dimensions, "model": EMBED})
    port = _free_port()
    models = {"object": "list", "data": [{"id": CHAT, "object": "model", "root": CHAT, "max_model_len": 2048},
                                         {"id": EMBED, "object": "model", "root": EMBED, "max_model_len": 256}]}
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF % {"js_module": JS_MODULE, "prefix": prefix, "port": port,
                                  "models": _nginx_json(models), "chat": _nginx_json(CHAT_REPLY),
                                  "completion": _nginx_json(COMPLETION_REPLY), "refusal": REFUSAL})
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=open(prefix / "stderr.log", "wb"),  # noqa: SIM115
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited {proc.returncode}: "
                                   f"{(prefix / 'stderr.log').read_text()[-1500:]}{(prefix / 'error.log').read_text()[-1500:] if (prefix / 'error.log').exists() else ''}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not listen within 10 s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
