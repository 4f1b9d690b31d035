#!/usr/bin/env bash
# Static validation of everything under deploy/ - no cluster, broker or
# container engine needed. Usable from any directory and in CI:
#
#   bash deploy/validate.sh
#
# It validates the deploy/ directory it lives in, so a copy elsewhere
# (cp -r deploy /tmp/x && bash /tmp/x/validate.sh) checks the copy.
#
# The first run creates a venv with the pinned tools from
# validate-requirements.txt (from PyPI); later runs reuse it until that file
# changes. Needs Python >= 3.11 (tomllib).
#
# Checks, one output line each (PASS/FAIL; the tool's output follows a FAIL):
#   k8s       every deploy/k8s/*.yaml holds exactly one object (no duplicate
#             keys) and validates: built-in kinds against the Kubernetes schemas
#             shipped by kubernetes-validate, strict (unknown fields fail), for
#             each of $K8S_VERSIONS; CRD kinds (KEDA) against
#             deploy/schemas/<group>-<version>-<Kind>.json with check-jsonschema.
#             A kind with neither schema FAILS - nothing is skipped.
#   config    every *.toml key of a ConfigMap parses and matches
#             schemas/sluice-config.json (the settings in shared/src/config.rs,
#             which reject unknown keys); failover names another relay; every
#             SLUICE__SECTION__KEY variable in compose.yaml and k8s/ names a
#             known setting, and the relays it names are defined
#   compose   compose.yaml against the compose specification (vendored in
#             check-jsonschema) + the local files it mounts/builds exist
#   rabbitmq  definitions.json is strict JSON and matches
#             schemas/rabbitmq-definitions.json; rabbitmq.conf and
#             enabled_plugins are well-formed
#   docker    hadolint on every Dockerfile, nothing at warning level or above
#   schemas   deploy/schemas/*.json are valid JSON Schemas
#   samples   sample recipients only use reserved example domains
#   alerts    prometheus/*.yaml pass `promtool check rules`, and
#             prometheus/*.test.yaml pass `promtool test rules`. promtool comes
#             from Debian's `prometheus` package (deploy/services.sh installs
#             it) or $PROMTOOL; without it the checks FAIL, they do not skip.
#   keda      the KEDA ScaledObject's maxReplicaCount equals the sum of the
#             relays' max_connections in the ConfigMap's sluice.toml (a worker
#             without a budget slot sends nothing; deploy/SCALING.md)
#
# Environment:
#   K8S_VERSIONS          Kubernetes versions to validate against (default "1.30.0 1.37.0")
#   SLUICE_VALIDATE_VENV  venv location (default ${XDG_CACHE_HOME:-~/.cache}/sluice-validate-venv)
#   PYTHON                interpreter used to create the venv (default python3)
#   PROMTOOL              promtool binary (default: promtool on PATH)
#
# Exit status: 0 if every check passed, 1 if any failed, 2 on setup errors.
set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQUIREMENTS="$DEPLOY_DIR/validate-requirements.txt"
CACHE_HOME="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}"
VENV="${SLUICE_VALIDATE_VENV:-$CACHE_HOME/sluice-validate-venv}"
PYTHON="${PYTHON:-python3}"
read -r -a K8S_VERSIONS <<<"${K8S_VERSIONS:-1.30.0 1.37.0}"

die() { printf 'validate: %s\n' "$*" >&2; exit 2; }

# --- tools ------------------------------------------------------------------
ensure_venv() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "Python >= 3.11 required, $PYTHON is $("$PYTHON" -V 2>&1)"
    local stamp="$VENV/.sluice-requirements" want
    want="$(cksum <"$REQUIREMENTS") $("$PYTHON" -V 2>&1)"
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    printf 'validate: installing tools into %s (once)\n' "$VENV" >&2
    # Only ever delete a directory that is (or was meant to be) our venv.
    if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" && -n "$(ls -A "$VENV" 2>/dev/null)" ]]; then
        die "$VENV exists and is not a venv; set SLUICE_VALIDATE_VENV to another path"
    fi
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    local log
    log="$(mktemp "${TMPDIR:-/tmp}/sluice-validate-pip.XXXXXX")"
    local -a pip
    if "$PYTHON" -m venv "$VENV" >"$log" 2>&1; then
        pip=("$VENV/bin/python" -m pip)
    else
        # Debian's python3 without the python3-venv package has no ensurepip:
        # make a pip-less venv and install into it with the system pip.
        rm -rf "$VENV"
        "$PYTHON" -m venv --without-pip "$VENV" >>"$log" 2>&1 \
            || { cat "$log" >&2; rm -f "$log"; die "cannot create a venv (apt-get install python3-venv)"; }
        pip=("$PYTHON" -m pip --python "$VENV/bin/python")
    fi
    if ! "${pip[@]}" install --disable-pip-version-check --no-input --quiet \
            -r "$REQUIREMENTS" >>"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        rm -rf "$VENV"
        die "pip install -r $REQUIREMENTS failed"
    fi
    rm -f "$log"
    printf '%s' "$want" >"$stamp"
}

ensure_venv
VPY="$VENV/bin/python"
BIN="$VENV/bin"

# Small helpers in Python (PyYAML from the venv). Written to a temp file so
# that stdin stays free.
HELPER="$(mktemp "${TMPDIR:-/tmp}/sluice-validate-helper.XXXXXX")"
trap 'rm -f "$HELPER"' EXIT
cat >"$HELPER" <<'PY'
import csv, io, json, os, re, sys, tomllib
import yaml


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last)."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_docs(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        sys.exit(f"{path}: {e}")


def one_object(path):
    docs = load_docs(path)
    if len(docs) != 1:
        sys.exit(f"{path}: expected exactly one object, found {len(docs)}")
    doc = docs[0]
    if not isinstance(doc, dict):
        sys.exit(f"{path}: top level is not a mapping")
    for field in ("apiVersion", "kind"):
        if not isinstance(doc.get(field), str) or not doc[field]:
            sys.exit(f"{path}: missing or empty {field}")
    if not isinstance(doc.get("metadata"), dict) or not doc["metadata"].get("name"):
        sys.exit(f"{path}: missing metadata.name")
    return doc


def cmd_kind(path):
    doc = one_object(path)
    print(doc["apiVersion"], doc["kind"])


def try_one_object(path):
    """The file's object, or None if it is broken (the k8s check reports that)."""
    try:
        return one_object(path)
    except SystemExit:
        return None


def configmap_entries(path, suffix):
    doc = try_one_object(path)
    if doc is None or doc["kind"] != "ConfigMap":
        return []
    return [(k, v) for k, v in (doc.get("data") or {}).items() if k.endswith(suffix)]


def load_schema(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cmd_toml(schema_path, *paths):
    """Every *.toml entry of a ConfigMap parses and matches the sluice config schema."""
    import jsonschema
    validator = jsonschema.Draft202012Validator(load_schema(schema_path))
    errors, n = [], 0
    for path in paths:
        for key, text in configmap_entries(path, ".toml"):
            n += 1
            where = f"{path}: data.{key}"
            try:
                conf = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                errors.append(f"{where}: {e}")
                continue
            for err in validator.iter_errors(conf):
                loc = ".".join(str(p) for p in err.absolute_path) or "(top)"
                errors.append(f"{where}: {loc}: {err.message}")
            relays = conf.get("relays", {})
            for name, relay in relays.items():
                target = relay.get("failover") if isinstance(relay, dict) else None
                if target is not None and (target == name or target not in relays):
                    errors.append(f"{where}: relays.{name}.failover = {target!r} "
                                  "is not another configured relay")
    if n == 0:
        errors.append("no *.toml entry found in any ConfigMap")
    if errors:
        sys.exit("\n".join(errors))


def env_names_compose(path):
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    for name, svc in (doc.get("services") or {}).items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
        yield f"{path}: services.{name}", env


def env_names_k8s(path):
    doc = try_one_object(path)
    if doc is None:
        return
    spec = doc.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    if doc["kind"] == "CronJob":
        pod = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
        env = {e["name"]: e.get("value") for e in c.get("env") or []}
        yield f"{path}: container {c.get('name')}", env


def cmd_env(schema_path, compose, *k8s_paths):
    """SLUICE__SECTION__KEY variables name keys that exist; relays they name are defined."""
    root = load_schema(schema_path)
    toml_relays, toml_ok = set(), True
    for path in k8s_paths:
        for _, text in configmap_entries(path, ".toml"):
            try:
                toml_relays |= set(tomllib.loads(text).get("relays", {}))
            except tomllib.TOMLDecodeError:
                toml_ok = False  # reported by the toml check
    errors, n = [], 0
    sources = [(w, e, "compose") for w, e in env_names_compose(compose)]
    for path in k8s_paths:
        sources += [(w, e, "k8s") for w, e in env_names_k8s(path)]
    for where, env, kind in sources:
        relays_in_env = {}
        for var in env:
            if not var.startswith("SLUICE__"):
                continue
            n += 1
            keys = var[len("SLUICE__"):].lower().split("__")
            problem = walk(root, keys)
            if problem:
                errors.append(f"{where}: {var}: {problem}")
            if len(keys) >= 3 and keys[0] == "relays":
                relays_in_env.setdefault(keys[1], set()).add(keys[2])
        for relay, keys in relays_in_env.items():
            if kind == "k8s" and toml_ok and relay not in toml_relays:
                errors.append(f"{where}: SLUICE__RELAYS__{relay.upper()}__* names relay "
                              f"{relay!r}, which no ConfigMap sluice.toml defines")
            if kind == "compose" and "host" not in keys:
                errors.append(f"{where}: relay {relay!r} has no SLUICE__RELAYS__"
                              f"{relay.upper()}__HOST (it would default to 127.0.0.1)")
    if n == 0:
        errors.append("no SLUICE__* variable found")
    if errors:
        sys.exit("\n".join(errors))


def resolve(root, node):
    """Follow local `$ref`s ("#/$defs/...")."""
    while isinstance(node, dict) and "$ref" in node:
        target = root
        for part in node_ref_parts(node):
            target = target[part]
        node = target
    return node


def node_ref_parts(node):
    ref = node["$ref"]
    if not ref.startswith("#/"):
        raise ValueError(f"unsupported $ref {ref!r}")
    return ref[2:].split("/")


def walk(root, keys):
    """Follow `keys` through the schema; None if they name a setting, else the problem."""
    node = resolve(root, root)
    for i, key in enumerate(keys):
        props = node.get("properties", {})
        if key in props:
            node = resolve(root, props[key])
        elif isinstance(node.get("additionalProperties"), dict):
            node = resolve(root, node["additionalProperties"])
        else:
            return f"no such setting {'.'.join(keys[:i + 1])!r}"
    return None


def strict_json(path):
    def pairs(items):
        keys = [k for k, _ in items]
        dups = {k for k in keys if keys.count(k) > 1}
        if dups:
            raise ValueError(f"duplicate keys {sorted(dups)}")
        return dict(items)
    with open(path, encoding="utf-8") as f:
        return json.load(f, object_pairs_hook=pairs)


def cmd_json(path):
    try:
        strict_json(path)
    except ValueError as e:  # JSONDecodeError is a ValueError
        sys.exit(f"{path}: {e}")


def cmd_rabbitmq_conf(conf, plugins):
    # rabbitmq.conf is sysctl-style: `key = value`, '#' comments.
    key_re = re.compile(r"^[a-z_][a-z0-9_]*(\.[A-Za-z0-9_$-]+)*$")
    seen = {}
    with open(conf, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            key, sep, value = s.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key_re.match(key) or not value:
                sys.exit(f"{conf}:{n}: not a `key = value` line: {s}")
            if key in seen:
                sys.exit(f"{conf}:{n}: {key} already set on line {seen[key]}")
            seen[key] = n
    with open(plugins, encoding="utf-8") as f:
        text = f.read().strip()
    if not re.fullmatch(r"\[\s*([a-z_]+\s*(,\s*[a-z_]+\s*)*)?\]\s*\.", text):
        sys.exit(f"{plugins}: expected an Erlang list like [rabbitmq_management].")
    if "rabbitmq_management" not in text:
        sys.exit(f"{plugins}: rabbitmq_management is not enabled")


def cmd_compose_paths(path):
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    missing = []
    for name, svc in (doc.get("services") or {}).items():
        build = svc.get("build")
        if isinstance(build, str):
            build = {"context": build}
        if isinstance(build, dict):
            ctx = os.path.normpath(os.path.join(base, build.get("context", ".")))
            dockerfile = os.path.join(ctx, build.get("dockerfile", "Dockerfile"))
            for p in (ctx, dockerfile):
                if not os.path.exists(p):
                    missing.append(f"services.{name}.build: {p}")
        for vol in svc.get("volumes") or []:
            src = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")):
                p = os.path.normpath(os.path.join(base, src))
                if not os.path.exists(p):
                    missing.append(f"services.{name}.volumes: {p}")
    if missing:
        sys.exit("missing local paths:\n" + "\n".join(missing))


RESERVED = re.compile(
    r"@([a-z0-9-]+\.)*(example\.(com|org|net)|example|test|invalid|localhost)$", re.I)


def check_recipients(text, where):
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "email" not in rows[0]:
        sys.exit(f"{where}: no `email` column / no rows")
    bad = [r["email"] for r in rows if not RESERVED.search(r["email"] or "")]
    if bad:
        sys.exit(f"{where}: recipients outside reserved example domains "
                 f"(RFC 2606): {bad}")
    return len(rows)


def cmd_samples(csv_path, *configmaps):
    with open(csv_path, encoding="utf-8") as f:
        check_recipients(f.read(), csv_path)
    for path in configmaps:
        for key, text in configmap_entries(path, ".csv"):
            check_recipients(text, f"{path}: data.{key}")


def cmd_keda_cap(scaledobject, *configmaps):
    """maxReplicaCount == the sum of max_connections over the ConfigMap's relays."""
    doc = try_one_object(scaledobject)
    if doc is None or doc["kind"] != "ScaledObject":
        sys.exit(f"{scaledobject}: not a single ScaledObject")
    cap = (doc.get("spec") or {}).get("maxReplicaCount")
    budgets, errors = {}, []
    for path in configmaps:
        for key, text in configmap_entries(path, "sluice.toml"):
            try:
                relays = tomllib.loads(text).get("relays", {})
            except tomllib.TOMLDecodeError:
                continue  # reported by the toml check
            for name, relay in relays.items():
                if not isinstance(relay.get("max_connections"), int):
                    errors.append(f"{path}: data.{key}: relays.{name} has no explicit "
                                  "max_connections (the cap is computed from it)")
                else:
                    budgets[name] = relay["max_connections"]
    if not budgets and not errors:
        errors.append("no relay with max_connections in any ConfigMap sluice.toml")
    total = sum(budgets.values())
    if budgets and cap != total:
        terms = " + ".join(f"{v} ({k})" for k, v in budgets.items())
        errors.append(f"{scaledobject}: spec.maxReplicaCount is {cap!r}, but the relays' "
                      f"budgets give {terms} = {total}")
    if errors:
        sys.exit("\n".join(errors))


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])
PY

helper() { "$VPY" "$HELPER" "$@"; }

# --- reporting --------------------------------------------------------------
passed=0
failed=0
# check LABEL CMD [ARGS...]: run CMD, print one PASS/FAIL line, and the
# command's output (indented) on failure.
check() {
    local label="$1" out
    shift
    if out="$("$@" 2>&1)"; then
        printf 'PASS  %s\n' "$label"
        passed=$((passed + 1))
    else
        printf 'FAIL  %s\n' "$label"
        [[ -n "$out" ]] && printf '%s\n' "$out" | sed 's/^/        /'
        failed=$((failed + 1))
    fi
}

rel() { printf '%s' "${1#"$DEPLOY_DIR"/}"; }

# kubernetes-validate prints WARN and exits 0 for a kind it has no schema for;
# require an explicit "passed" line for every requested version instead.
k8s_builtin() {
    local file="$1" out args=()
    local v
    for v in "${K8S_VERSIONS[@]}"; do args+=(-k "$v"); done
    out="$("$BIN/kubernetes-validate" --strict "${args[@]}" "$file" 2>&1)" || { printf '%s\n' "$out"; return 1; }
    printf '%s\n' "$out"
    [[ "$(grep -c ' passed for resource ' <<<"$out")" -eq "${#K8S_VERSIONS[@]}" ]]
}

# fail_with MESSAGE: a check that fails with MESSAGE (for failures found here).
fail_with() {
    printf '%s\n' "$*"
    return 1
}

# --- checks -------------------------------------------------------------------
cd "$DEPLOY_DIR"

shopt -s nullglob
k8s_files=("$DEPLOY_DIR"/k8s/*.yaml "$DEPLOY_DIR"/k8s/*.yml)
shopt -u nullglob
if [[ ${#k8s_files[@]} -eq 0 ]]; then
    check "k8s       deploy/k8s" fail_with "no manifests found in $DEPLOY_DIR/k8s"
fi
for f in "${k8s_files[@]}"; do
    if ! ident="$(helper kind "$f" 2>&1)"; then
        check "k8s       $(rel "$f")" fail_with "$ident"
        continue
    fi
    api="${ident% *}"
    kind="${ident#* }"
    schema="$DEPLOY_DIR/schemas/${api//\//-}-$kind.json"
    if [[ "$api" == */* && "${api%%/*}" == *.* && "${api%%/*}" != *.k8s.io ]]; then
        # A group outside Kubernetes' own (e.g. keda.sh): a CRD.
        if [[ -f "$schema" ]]; then
            check "k8s       $(rel "$f")  ($api $kind, $(rel "$schema"))" \
                "$BIN/check-jsonschema" --schemafile "$schema" "$f"
        else
            check "k8s       $(rel "$f")  ($api $kind)" fail_with \
                "no schema for $api $kind: not a built-in kind and $(rel "$schema") does not exist"
        fi
    else
        check "k8s       $(rel "$f")  ($api $kind, Kubernetes ${K8S_VERSIONS[*]}, strict)" \
            k8s_builtin "$f"
    fi
done

check "config    ConfigMap sluice.toml  (TOML, schemas/sluice-config.json, failover targets)" \
    helper toml "$DEPLOY_DIR/schemas/sluice-config.json" "${k8s_files[@]}"
check "config    SLUICE__* variables in compose.yaml and k8s/  (known keys, defined relays)" \
    helper env "$DEPLOY_DIR/schemas/sluice-config.json" "$DEPLOY_DIR/compose.yaml" "${k8s_files[@]}"

check "compose   compose.yaml  (compose-spec)" \
    "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec "$DEPLOY_DIR/compose.yaml"
check "compose   compose.yaml  (mounted and built paths exist)" \
    helper compose-paths "$DEPLOY_DIR/compose.yaml"

check "rabbitmq  rabbitmq/definitions.json  (strict JSON)" \
    helper json "$DEPLOY_DIR/rabbitmq/definitions.json"
check "rabbitmq  rabbitmq/definitions.json  (schemas/rabbitmq-definitions.json)" \
    "$BIN/check-jsonschema" --schemafile "$DEPLOY_DIR/schemas/rabbitmq-definitions.json" \
    "$DEPLOY_DIR/rabbitmq/definitions.json"
check "rabbitmq  rabbitmq/rabbitmq.conf, rabbitmq/enabled_plugins  (syntax)" \
    helper rabbitmq-conf "$DEPLOY_DIR/rabbitmq/rabbitmq.conf" "$DEPLOY_DIR/rabbitmq/enabled_plugins"

shopt -s nullglob
dockerfiles=("$DEPLOY_DIR"/Dockerfile "$DEPLOY_DIR"/*.Dockerfile)
shopt -u nullglob
if [[ ${#dockerfiles[@]} -eq 0 ]]; then
    check "docker    Dockerfiles" fail_with "no Dockerfile or *.Dockerfile in $DEPLOY_DIR"
fi
for f in "${dockerfiles[@]}"; do
    check "docker    $(rel "$f")  (hadolint, failure threshold: warning)" \
        "$BIN/hadolint" --no-color --failure-threshold warning "$f"
done

check "schemas   schemas/*.json are valid JSON Schemas" \
    "$BIN/check-jsonschema" --check-metaschema "$DEPLOY_DIR"/schemas/*.json

check "samples   recipients only at reserved example domains" \
    helper samples "$DEPLOY_DIR/sample/recipients.csv" "${k8s_files[@]}"

PROMTOOL="${PROMTOOL:-$(command -v promtool || true)}"
shopt -s nullglob
alert_tests=("$DEPLOY_DIR"/prometheus/*.test.yaml)
alert_rules=()
for f in "$DEPLOY_DIR"/prometheus/*.yaml; do
    [[ "$f" == *.test.yaml ]] || alert_rules+=("$f")
done
shopt -u nullglob
no_promtool="promtool not found: apt-get install prometheus (bash deploy/services.sh does), or set PROMTOOL"
if [[ ${#alert_rules[@]} -eq 0 ]]; then
    check "alerts    deploy/prometheus" fail_with "no alert rules found in $DEPLOY_DIR/prometheus"
fi
for f in "${alert_rules[@]}"; do
    if [[ -z "$PROMTOOL" ]]; then
        check "alerts    $(rel "$f")  (promtool check rules)" fail_with "$no_promtool"
    else
        check "alerts    $(rel "$f")  (promtool check rules)" "$PROMTOOL" check rules "$f"
    fi
done
for f in "${alert_tests[@]}"; do
    if [[ -z "$PROMTOOL" ]]; then
        check "alerts    $(rel "$f")  (promtool test rules)" fail_with "$no_promtool"
    else
        # Rule files in a test are relative to the test file.
        check "alerts    $(rel "$f")  (promtool test rules)" \
            bash -c 'cd "$(dirname "$2")" && "$1" test rules "$(basename "$2")"' _ "$PROMTOOL" "$f"
    fi
done

check "keda      k8s/keda-scaledobject.yaml  (maxReplicaCount = sum of relays' max_connections)" \
    helper keda-cap "$DEPLOY_DIR/k8s/keda-scaledobject.yaml" "${k8s_files[@]}"

printf 'deploy checks: %d ok, %d failing\n' "$passed" "$failed"
[[ "$failed" -eq 0 ]]
