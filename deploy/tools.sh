#!/usr/bin/env bash
# The tools that validate deploy/helm and deploy/strimzi offline, installed once into a cache
# and reused: a warm run takes a second or two.
#
#   deploy/tools.sh            install what is missing, then print NAME=VALUE lines (below)
#   deploy/tools.sh --check    print them only if everything is installed; exit 1 otherwise
#   deploy/tools.sh --apiserver  also a real kube-apiserver, etcd and kubectl, built from source
#                              (about 6 minutes cold, well under a second warm), for
#                              tests/test_deploy_apiserver.py (server-side dry runs, helm install)
#
# Needs Go (helm, kubeconform, the Prometheus Operator CRDs as a Go module), Maven and a
# JDK 21+ (the Strimzi CRD generator; JAVA_HOME, `java` on PATH or /usr/lib/jvm/*), and a
# Python with kubernetes-validate (PYTHON, default .venv/bin/python, else python3; it is in
# the `dev` extra). Everything goes under ${RTCBUS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rtcbus}/deploy,
# each part in a directory named by its version, built in a temporary directory and moved
# into place whole, under a lock: an interrupted or concurrent run never leaves half of one.
#
# Output on stdout, one NAME=VALUE a line (progress goes to stderr):
#   HELM                      the helm binary
#   KUBECONFORM               the kubeconform binary
#   KUBERNETES_SCHEMAS        a kubeconform -schema-location root holding
#                             v<version>-standalone-strict/<kind>-<group>-<version>.json
#   KUBERNETES_VERSIONS       the Kubernetes versions whose schemas are there (space-separated)
#   CRD_SCHEMAS               <group>/<kind>_<version>.json for Strimzi and the Prometheus
#                             Operator (strict: additionalProperties false where the CRD has properties)
#   STRIMZI_CRDS              the generated Strimzi CustomResourceDefinitions (YAML)
#   PROMETHEUS_OPERATOR_CRDS  the Prometheus Operator's CustomResourceDefinitions (YAML)
#   KUBE_APISERVER, ETCD, KUBECTL  with --apiserver (reporting the version APISERVER_VERSION).
#                             Run etcd, then kube-apiserver with --etcd-servers,
#                             --endpoint-reconciler-type none (a loopback address is refused
#                             otherwise), --authorization-mode AlwaysAllow, --token-auth-file,
#                             --service-account-{issuer,key-file,signing-key-file}; see
#                             tests/test_deploy_apiserver.py.
set -euo pipefail

HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0
STRIMZI_VERSION=1.2.0
PROMETHEUS_OPERATOR_VERSION=v0.85.0
# The oldest and the newest Kubernetes the chart is checked against (kubernetes-validate's
# bundled schemas; the chart's README says the same lower bound. No kubeVersion in Chart.yaml:
# `helm template` assumes Kubernetes 1.20 without --kube-version, and would refuse).
KUBERNETES_VERSIONS="1.29.0 1.37.0"
# --apiserver: k8s.io/kubernetes and the etcd server.
APISERVER_VERSION=v1.37.0
ETCD_VERSION=v3.6.16

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache="${RTCBUS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rtcbus}/deploy"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
# Absolute: the steps below run in temporary directories.
if [[ "$PYTHON" == */* ]]; then PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"; fi

helm_dir="$cache/helm-$HELM_VERSION"
kubeconform_dir="$cache/kubeconform-$KUBECONFORM_VERSION"
strimzi_dir="$cache/strimzi-$STRIMZI_VERSION"
promop_dir="$cache/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION"
# Named by the kubernetes-validate version too: its schemas are what is converted.
kv_version=""
kube_dir=""
crd_dir="$cache/crd-schemas-strimzi-$STRIMZI_VERSION-prometheus-operator-$PROMETHEUS_OPERATOR_VERSION"
# -r2: built with the version in (the first build said v0.0.0-master to helm and kubectl).
apiserver_dir="$cache/apiserver-$APISERVER_VERSION-etcd-$ETCD_VERSION-r2"
want_apiserver=""
[ "${1:-}" = "--apiserver" ] && want_apiserver=1

say() { echo "tools.sh: $*" >&2; }
die() { echo "tools.sh: FAILED: $*" >&2; exit 1; }

kubernetes_validate_dir() {
    "$PYTHON" -c 'import kubernetes_validate, os, importlib.metadata as m; print(m.version("kubernetes-validate")); print(os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema"))' 2>/dev/null
}

resolve_kube_dir() {
    local out
    if ! out=$(kubernetes_validate_dir); then
        return 1
    fi
    kv_version=$(sed -n 1p <<<"$out")
    kv_schemas=$(sed -n 2p <<<"$out")
    kube_dir="$cache/kubernetes-schemas-kv$kv_version"
}

print_env() {
    printf "%s=%q\n" HELM "$helm_dir/helm"
    printf "%s=%q\n" KUBECONFORM "$kubeconform_dir/kubeconform"
    printf "%s=%q\n" KUBERNETES_SCHEMAS "$kube_dir"
    printf "%s=%q\n" KUBERNETES_VERSIONS "$KUBERNETES_VERSIONS"
    printf "%s=%q\n" CRD_SCHEMAS "$crd_dir"
    printf "%s=%q\n" STRIMZI_CRDS "$strimzi_dir/crds"
    printf "%s=%q\n" PROMETHEUS_OPERATOR_CRDS "$promop_dir/crds"
    if [ -n "$want_apiserver" ]; then
        printf "%s=%q\n" KUBE_APISERVER "$apiserver_dir/kube-apiserver"
        printf "%s=%q\n" ETCD "$apiserver_dir/etcd"
        printf "%s=%q\n" KUBECTL "$apiserver_dir/kubectl"
    fi
}

installed() {
    [ -x "$helm_dir/helm" ] && [ -x "$kubeconform_dir/kubeconform" ] &&
        [ -f "$strimzi_dir/.done" ] && [ -f "$promop_dir/.done" ] &&
        [ -n "$kube_dir" ] && [ -f "$kube_dir/.done" ] && [ -f "$crd_dir/.done" ] &&
        { [ -z "$want_apiserver" ] || [ -f "$apiserver_dir/.done" ]; }
}

resolve_kube_dir || true
if [ "${1:-}" = "--check" ]; then
    installed || exit 1
    print_env
    exit 0
fi
if installed; then
    print_env
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # a concurrent run waits, then finds everything installed
tmp=$(mktemp -d "$cache/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

go_install() {  # go_install NAME DIR PACKAGE@VERSION
    local name=$1 dir=$2 package=$3 started=$SECONDS
    [ -x "$dir/$name" ] && return 0
    command -v go >/dev/null || die "$name: Go is not installed (go install $package)"
    say "$name: go install $package (about a minute the first time)"
    mkdir -p "$tmp/$name"
    GOBIN="$tmp/$name" GOFLAGS="${GOFLAGS:-} -buildvcs=false" go install "$package" >&2 ||
        die "$name: go install $package"
    rm -rf "$dir"
    mv "$tmp/$name" "$dir"
    say "$name: $dir/$name ($((SECONDS - started)) s)"
}

go_install helm "$helm_dir" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
go_install kubeconform "$kubeconform_dir" "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"

# -- Kubernetes schemas: kubernetes-validate's, made loadable by kubeconform -----------------
if [ -z "$kube_dir" ]; then
    die "kubernetes-validate: not importable by $PYTHON (pip install -e '.[dev]', or set PYTHON)"
fi
if [ ! -f "$kube_dir/.done" ]; then
    say "kubernetes schemas: converting kubernetes-validate $kv_version's for $KUBERNETES_VERSIONS"
    mkdir -p "$tmp/kube"
    # kubeconform reads local schemas by file, and resolves a $ref against the file's
    # own location only when the schema has no $id: drop $id, and make the absolute
    # "/api/_definitions.json#..." refs relative to the sibling file.
    "$PYTHON" - "$kv_schemas" "$tmp/kube" $KUBERNETES_VERSIONS <<'EOF' || die "kubernetes schemas: conversion"
import json, os, sys

source, target, *versions = sys.argv[1:]

def fix(node):
    if isinstance(node, dict):
        node.pop("$id", None)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("/api/_definitions.json"):
            node["$ref"] = ref[len("/api/"):]
        for value in node.values():
            fix(value)
    elif isinstance(node, list):
        for value in node:
            fix(value)

for version in versions:
    src = os.path.join(source, f"v{version}-local-strict")
    if not os.path.isdir(src):
        sys.exit(f"kubernetes-validate has no schemas for Kubernetes {version}")
    dst = os.path.join(target, f"v{version}-standalone-strict")
    os.makedirs(dst)
    for name in os.listdir(src):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(src, name)) as f:
            schema = json.load(f)
        fix(schema)
        with open(os.path.join(dst, name), "w") as f:
            json.dump(schema, f)
EOF
    touch "$tmp/kube/.done"
    rm -rf "$kube_dir"
    mv "$tmp/kube" "$kube_dir"
fi

# -- Strimzi CRDs: generated from io.strimzi:api with io.strimzi:crd-generator -------------------
find_java21() {
    local candidate version
    for candidate in "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java || true)" /usr/lib/jvm/*/bin/java; do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        version=$("$candidate" -XshowSettings:properties -version 2>&1 |
            sed -n 's/^ *java.specification.version = //p')
        if [ -n "$version" ] && [ "${version%%.*}" -ge 21 ] 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [ ! -f "$strimzi_dir/.done" ]; then
    started=$SECONDS
    command -v mvn >/dev/null || die "strimzi CRDs: Maven is not installed"
    java=$(find_java21) || die "strimzi CRDs: no JDK 21+ (the CRD generator needs one; set JAVA_HOME)"
    say "strimzi CRDs: io.strimzi:crd-generator $STRIMZI_VERSION on $java"
    mkdir -p "$tmp/strimzi/crds"
    cat >"$tmp/strimzi/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.rtcbus</groupId>
  <artifactId>strimzi-crds</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>io.strimzi</groupId><artifactId>api</artifactId><version>$STRIMZI_VERSION</version></dependency>
    <dependency><groupId>io.strimzi</groupId><artifactId>crd-generator</artifactId><version>$STRIMZI_VERSION</version></dependency>
  </dependencies>
  <build><plugins><plugin>
    <groupId>org.apache.maven.plugins</groupId><artifactId>maven-dependency-plugin</artifactId><version>3.8.1</version>
  </plugin></plugins></build>
</project>
EOF
    mvn -q -B -f "$tmp/strimzi/pom.xml" dependency:build-classpath \
        -Dmdep.outputFile="$tmp/strimzi/classpath.txt" >&2 ||
        die "strimzi CRDs: mvn dependency:build-classpath (io.strimzi:api, io.strimzi:crd-generator $STRIMZI_VERSION)"
    model=io.strimzi.api.kafka.model
    crds=$tmp/strimzi/crds
    "$java" -cp "$(cat "$tmp/strimzi/classpath.txt")" io.strimzi.crdgenerator.CrdGenerator \
        --yaml --crd-api-version v1 \
        "$model.kafka.Kafka=$crds/kafkas.kafka.strimzi.io.yaml" \
        "$model.nodepool.KafkaNodePool=$crds/kafkanodepools.kafka.strimzi.io.yaml" \
        "$model.topic.KafkaTopic=$crds/kafkatopics.kafka.strimzi.io.yaml" \
        "$model.user.KafkaUser=$crds/kafkausers.kafka.strimzi.io.yaml" >&2 ||
        die "strimzi CRDs: io.strimzi.crdgenerator.CrdGenerator"
    touch "$tmp/strimzi/.done"
    rm -rf "$strimzi_dir"
    mv "$tmp/strimzi" "$strimzi_dir"
    say "strimzi CRDs: $strimzi_dir/crds ($((SECONDS - started)) s)"
fi

# -- Prometheus Operator CRDs: in the Go module's zip -------------------------------------------------
if [ ! -f "$promop_dir/.done" ]; then
    command -v go >/dev/null || die "prometheus-operator CRDs: Go is not installed"
    module=github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION
    say "prometheus-operator CRDs: go mod download $module"
    moddir=$(cd "$tmp" && GOFLAGS=-mod=mod go mod download -json "$module" |
        "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') ||
        die "prometheus-operator CRDs: go mod download $module"
    mkdir -p "$tmp/promop/crds"
    cp "$moddir"/example/prometheus-operator-crd/monitoring.coreos.com_*.yaml "$tmp/promop/crds/" ||
        die "prometheus-operator CRDs: none in $moddir/example/prometheus-operator-crd"
    chmod u+w "$tmp/promop/crds"/*  # the module cache is read-only
    touch "$tmp/promop/.done"
    rm -rf "$promop_dir"
    mv "$tmp/promop" "$promop_dir"
fi

# -- CRDs as kubeconform schemas ------------------------------------------------------------------------
if [ ! -f "$crd_dir/.done" ]; then
    say "CRD schemas: converting the Strimzi and Prometheus Operator CRDs"
    mkdir -p "$tmp/crd"
    "$PYTHON" - "$tmp/crd" "$strimzi_dir"/crds/*.yaml "$promop_dir"/crds/*.yaml <<'EOF' || die "CRD schemas: conversion"
# What kubeconform's openapi2jsonschema.py does, for the strict schemas: each served
# version's openAPIV3Schema as <group>/<kind>_<version>.json, with the OpenAPI
# extensions JSON Schema does not know turned into their meaning, and
# additionalProperties false on every object that lists its properties and does not
# say otherwise.
import json, os, sys
import yaml

target, *files = sys.argv[1:]

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# An enum entry "=" is YAML 1.1's value key to PyYAML; here it is the string.
Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))

def strict(node):
    if isinstance(node, list):
        return [strict(value) for value in node]
    if not isinstance(node, dict):
        return node
    node = {key: strict(value) for key, value in node.items()}
    if node.pop("x-kubernetes-int-or-string", False):
        node.pop("type", None)
        node["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if node.pop("nullable", False) and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and "additionalProperties" not in node and not preserve:
        node["additionalProperties"] = False
    return node

count = 0
for path in files:
    with open(path) as f:
        for crd in yaml.load_all(f, Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"].lower()
            for version in crd["spec"]["versions"]:
                if not version.get("served", True):
                    continue
                schema = strict(version["schema"]["openAPIV3Schema"])
                # apiVersion, kind and metadata are checked by the API server itself.
                schema.setdefault("properties", {}).update(
                    apiVersion={"type": "string", "enum": [f"{group}/{version['name']}"]},
                    kind={"type": "string", "enum": [crd["spec"]["names"]["kind"]]},
                    metadata={"type": "object"},
                )
                os.makedirs(os.path.join(target, group), exist_ok=True)
                with open(os.path.join(target, group, f"{kind}_{version['name']}.json"), "w") as f:
                    json.dump(schema, f)
                count += 1
print(f"tools.sh: CRD schemas: {count} written", file=sys.stderr)
EOF
    touch "$tmp/crd/.done"
    rm -rf "$crd_dir"
    mv "$tmp/crd" "$crd_dir"
fi

# -- --apiserver: kube-apiserver, etcd and kubectl from source ----------------------------------------
# `go install` refuses both modules (their go.mod files have replace directives), so each is
# built in a module of its own that requires it; k8s.io/kubernetes's replace directives to its
# ./staging copies become replace directives to the published k8s.io/* v0.x of the same release.
if [ -n "$want_apiserver" ] && [ ! -f "$apiserver_dir/.done" ]; then
    started=$SECONDS
    command -v go >/dev/null || die "kube-apiserver: Go is not installed"
    say "kube-apiserver, kubectl $APISERVER_VERSION, etcd $ETCD_VERSION: building from source (about 6 minutes the first time)"
    mkdir -p "$tmp/apiserver/k8s" "$tmp/apiserver/etcd"
    # The download runs in $tmp (no go.mod there), the pipe where we are: PYTHON may be relative.
    gomod=$( (cd "$tmp" && go mod download -json "k8s.io/kubernetes@$APISERVER_VERSION") |
        "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["GoMod"])') ||
        die "kube-apiserver: go mod download k8s.io/kubernetes@$APISERVER_VERSION"
    staging="v0.${APISERVER_VERSION#v1.}"
    {
        printf 'module local/apiserver\n\ngo %s\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' \
            "$(sed -n 's/^go //p' "$gomod")" "$APISERVER_VERSION"
        sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*|\t\1 => \1 '"$staging"'|p' "$gomod"
        printf ')\n'
    } >"$tmp/apiserver/k8s/go.mod"
    printf 'module local/etcd\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >"$tmp/apiserver/etcd/go.mod"
    # The version the release build stamps in (hack/lib/version.sh); without it the server's
    # /version says v0.0.0-master, which helm compares with a chart's kubeVersion.
    minor=${APISERVER_VERSION#v1.}
    ldflags=""
    for setting in "gitVersion=$APISERVER_VERSION" gitMajor=1 "gitMinor=${minor%%.*}" gitTreeState=clean; do
        ldflags="$ldflags -X k8s.io/client-go/pkg/version.$setting -X k8s.io/component-base/version.$setting"
    done
    (cd "$tmp/apiserver/k8s" &&
        GOFLAGS=-mod=mod go build -ldflags "$ldflags" -o "$tmp/apiserver/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver &&
        GOFLAGS=-mod=mod go build -ldflags "$ldflags" -o "$tmp/apiserver/kubectl" k8s.io/kubernetes/cmd/kubectl) >&2 ||
        die "kube-apiserver: go build of k8s.io/kubernetes $APISERVER_VERSION"
    (cd "$tmp/apiserver/etcd" && GOFLAGS=-mod=mod go build -o "$tmp/apiserver/etcd-bin" go.etcd.io/etcd/server/v3) >&2 ||
        die "etcd: go build of go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    rm -rf "$tmp/apiserver/k8s" "$tmp/apiserver/etcd"
    mv "$tmp/apiserver/etcd-bin" "$tmp/apiserver/etcd"
    touch "$tmp/apiserver/.done"
    rm -rf "$apiserver_dir"
    mv "$tmp/apiserver" "$apiserver_dir"
    say "kube-apiserver, etcd, kubectl: $apiserver_dir ($((SECONDS - started)) s)"
fi

installed || die "something is still missing in $cache"
print_env
