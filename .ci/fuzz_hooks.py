"""schemathesis hooks for .ci/fuzz.

Filters:

- Keep the fuzzer from deleting the identity whose token it runs with (it
  would lock itself out and every later case would only test 401s).
- Skip bodies holding integral floats such as `48.0` where the schema says
  integer: JSON Schema counts them as integers, serde (hearth's parser)
  refuses them as floats, and no client of hearth's writes them.

Fix-ups (`map_case`) teach the generator the rules hearth enforces that JSON
Schema cannot state, so that a case generated as schema-valid (POSITIVE
mode at the body) is also valid to the server. They only touch positive
bodies: a negative body is left exactly as generated, and schemathesis
revalidates every body a hook changed, so a fix-up can never turn a case
the document calls invalid into one the checks treat as valid. Each fix-up
changes the least it can:

- Setup commands (`project_setup`, `repo_setup`, `warm_pool.setup_commands`,
  `setupCommands`): names are unique within a list. JSON Schema's
  `uniqueItems` compares whole items, not one field; a repeated name gets a
  ` #<n>` suffix.
- Repos of a workspace: each is cloned into `/home/<folder>`, the folder
  being `name` or, when it is absent, the last part of the URL without
  `.git`; the folder must be letters, digits, `.`, `_`, `-` (not `.` or
  `..`) and unique. A URL-derived folder cannot be stated in a schema; a
  repo whose folder is unusable or taken gets `name: repo-<n>`.
- Workspaces: `max_idle >= min_idle` (cross-field). A `max_idle` below the
  `min_idle` the write ends with is raised to it.
- Webhook URLs: https to a public address (see `_fix_webhook_url`).
- Identity and token `expires_in`: at most 366d as the sum of its terms
  (`200d200d` is too long; a pattern can bound each number but not their
  sum). A longer lifetime is replaced by its length modulo 366d, in seconds.

Rules that depend on the stored state read it with an authenticated GET
(`HEARTH_FUZZ_URL`, `HEARTH_FUZZ_TOKEN`, set by .ci/fuzz) just before the
case is sent (one worker, so nothing else writes in between):

- PATCH of a workspace: `max_idle >= min_idle` over the merged result (a
  patch may give one of them, the stored workspace the other).
- PATCH of a workspace's warm pool: `targetSize` becomes `min_idle`, so it
  may not exceed the stored `max_idle` (lowered to it otherwise).
- PATCH of an image: what a driver allows depends on the driver the merged
  image ends with, usually the stored one. The document states what is
  true of every patch (a patch naming `sandbox` sets no `debian` rootfs);
  the rest is fixed here: a sandbox image's rootfs becomes `minimal`.

A resource that is not stored needs no fix: its PATCH is a 404.
"""

import copy
import os
import re

import requests
import schemathesis
from schemathesis.core.parameters import ParameterLocation

FUZZ_IDENTITY = os.environ.get("HEARTH_FUZZ_IDENTITY", "admin")
BASE_URL = os.environ.get("HEARTH_FUZZ_URL", "").rstrip("/")
TOKEN = os.environ.get("HEARTH_FUZZ_TOKEN", "")
NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
FOLDER = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_EXPIRES_IN = 366 * 86400
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _has_integral_float(value):
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(_has_integral_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_integral_float(v) for v in value)
    return False


@schemathesis.hook
def filter_case(context, case):
    if (
        case.method.upper() == "DELETE"
        and case.operation.path == "/v1/identities/{name}"
        and (case.path_parameters or {}).get("name") == FUZZ_IDENTITY
    ):
        return False
    body = getattr(case, "body", None)
    if not isinstance(body, (str, bytes)) and _has_integral_float(body):
        return False
    return True


def _is_int(value):
    return type(value) is int


def _stored_spec(kind, name):
    """The stored spec of `kind`/`name`, or None when there is none."""
    if not BASE_URL or not isinstance(name, str) or not NAME.match(name):
        return None
    response = requests.get(
        f"{BASE_URL}/v1/{kind}/{name}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    if response.status_code != 200:
        return None
    spec = response.json().get("spec")
    return spec if isinstance(spec, dict) else None


def _merge(target, patch):
    """RFC 7396 merge patch (what hearth's PATCH applies)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _unique_commands(commands):
    if not isinstance(commands, list):
        return
    seen = set()
    for command in commands:
        if not isinstance(command, dict) or not isinstance(command.get("name"), str):
            continue
        name, n = command["name"], 2
        while name in seen:
            name = f"{command['name']} #{n}"
            n += 1
        command["name"] = name
        seen.add(name)


def _folder(repo):
    if isinstance(repo.get("name"), str):
        return repo["name"]
    url = repo.get("url")
    if not isinstance(url, str):
        return None
    trimmed = url.rstrip("/")
    last = re.split(r"[/:]", trimmed)[-1]
    return last[: -len(".git")] if last.endswith(".git") else last


def _unique_folders(repos):
    if not isinstance(repos, list):
        return
    seen = set()
    for i, repo in enumerate(repos):
        if not isinstance(repo, dict):
            continue
        folder = _folder(repo)
        usable = folder and folder not in (".", "..") and FOLDER.match(folder)
        if not usable or folder in seen:
            n = i
            while f"repo-{n}" in seen:
                n += 1
            folder = f"repo-{n}"
            repo["name"] = folder
        seen.add(folder)


def _idle_bounds(body, merged):
    min_idle = merged.get("min_idle")
    min_idle = min_idle if _is_int(min_idle) else 0
    max_idle = merged.get("max_idle")
    if _is_int(max_idle) and max_idle < min_idle:
        body["max_idle"] = min_idle


def _duration_secs(text):
    terms = re.findall(r"([0-9]+)([smhd])", text)
    if "".join(n + u for n, u in terms) != text:
        return None
    return sum(int(n) * UNITS[u] for n, u in terms)


def _fix_workspace(body, stored):
    merged = _merge(stored, body) if stored is not None else body
    _unique_folders(body.get("repos"))
    warm_pool = body.get("warm_pool")
    if isinstance(warm_pool, dict):
        _unique_commands(warm_pool.get("setup_commands"))
    if isinstance(merged, dict):
        _idle_bounds(body, merged)


def _fix_image(body, stored):
    merged = _merge(stored, body)
    if merged.get("driver") == "sandbox" and merged.get("rootfs") not in (None, "minimal"):
        body["rootfs"] = "minimal"


def _fix_webhook_url(body):
    """A webhook's URL reaches only public addresses over https (the fuzz
    server does not allow private ones): which addresses a host is, and
    whether it parses as one, a pattern cannot state. The scheme becomes
    `https` and the host `hearth-fuzz.invalid`, a name that never resolves
    (taken, its deliveries fail); the path is kept."""
    url = body.get("url")
    if not isinstance(url, str):
        return
    m = re.match(r"^https?://[^/]*(/.*)?$", url, re.S)
    if m:
        path = m.group(1) or ""
        if not re.fullmatch(r"[!$-~]*", path):
            path = "/"
        body["url"] = "https://hearth-fuzz.invalid" + path


@schemathesis.hook
def map_case(context, case):
    meta = case._meta
    body = getattr(case, "body", None)
    if not isinstance(body, dict) or meta is None or meta.is_negative_at(ParameterLocation.BODY):
        return case
    before = copy.deepcopy(body)
    method, path = case.method.upper(), case.operation.path
    name = (case.path_parameters or {}).get("name")
    if path == "/v1/environments/{name}" and method in ("PUT", "PATCH"):
        _unique_commands(body.get("project_setup"))
        _unique_commands(body.get("repo_setup"))
        # allow_host_ports needs network: egress, which a patch may leave to
        # the stored environment (cross-field, and against stored state).
        stored = _stored_spec("environments", name) if method == "PATCH" else None
        merged = _merge(stored or {}, body)
        if merged.get("allow_host_ports") and merged.get("network") not in (None, "egress"):
            body["network"] = "egress"
        # …and a qemu guest never gets network: host (the driver may come
        # from the stored environment).
        if merged.get("driver") == "qemu" and merged.get("network") == "host":
            body["network"] = "egress"
    elif path == "/v1/workspaces/{name}" and method == "PUT":
        _fix_workspace(body, None)
    elif path == "/v1/workspaces/{name}" and method == "PATCH":
        stored = _stored_spec("workspaces", name)
        if stored is not None:
            _fix_workspace(body, stored)
    elif path == "/v1/workspaces/{name}/warm-pool" and method == "PATCH":
        _unique_commands(body.get("setupCommands"))
        stored = _stored_spec("workspaces", name)
        size = body.get("targetSize")
        if stored is not None and _is_int(size):
            max_idle = stored.get("max_idle")
            if _is_int(max_idle) and size > max_idle:
                body["targetSize"] = max_idle
    elif path == "/v1/images/{name}" and method == "PATCH":
        stored = _stored_spec("images", name)
        if stored is not None:
            _fix_image(body, stored)
    elif path in ("/v1/identities", "/v1/identities/{name}/tokens") and method == "POST":
        text = body.get("expires_in")
        secs = _duration_secs(text) if isinstance(text, str) else None
        if secs is not None and secs > MAX_EXPIRES_IN:
            body["expires_in"] = f"{secs % MAX_EXPIRES_IN or MAX_EXPIRES_IN}s"
    elif path == "/v1/webhooks" and method == "POST":
        _fix_webhook_url(body)
    if body != before:
        # Setting the body marks it for revalidation (schemathesis also
        # notices in-place edits; this says so outright).
        case.body = body
    return case
