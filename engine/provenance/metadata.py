"""Provenance metadata in the files the engine writes, and reading it back.

Two layers, both written by ``avatar render``:

1. Container tags (always; any player or ``ffprobe`` shows them): ``comment`` holds the provenance
   record as JSON, ``description`` a sentence saying the video was created by a generative model.
   Anyone can strip or forge tags: they inform, they prove nothing.
2. A signed C2PA manifest (Content Credentials; ``c2pa-python``) with the ``c2pa.created`` action,
   ``digitalSourceType`` = trainedAlgorithmicMedia and the same record as an assertion. It binds the
   record to the file's bytes (a hash over the BMFF boxes): any edit breaks the signature. It is
   signed offline with a local key and certificate made at first use under the user's config
   folder (``$AVATAR_C2PA_DIR``, else ``$XDG_CONFIG_HOME/avatar-engine/c2pa``, else
   ``~/.config/avatar-engine/c2pa``; the key is never part of the repository). A local
   certificate is not on the C2PA trust list, so validators report the signature as valid but the
   signer as untrusted; an organisation that wants a trusted signer puts its own chain and key in
   ``$AVATAR_C2PA_CERT`` / ``$AVATAR_C2PA_KEY`` (PEM, ES256).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("avatar.provenance")

GENERATOR = "avatar-engine"
STATEMENT = "created by a generative model: a talking-head video synthesised by avatar-engine from a portrait and speech"
ASSERTION_LABEL = "org.avatar-engine.provenance"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MIME = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm"}


def engine_version() -> str:
    try:
        from importlib.metadata import version

        return version("avatar-engine")
    except Exception:  # not installed (a source checkout on sys.path)
        return "0+unknown"


def provenance_record(*, bundle_manifest_sha256: str, watermark: dict | None) -> dict:
    """The JSON record written to tags and the C2PA assertion. ``watermark``: the payload fields, or None
    when the frames are not watermarked."""
    return {
        "generator": GENERATOR,
        "generator_version": engine_version(),
        "generative_model": True,
        "statement": STATEMENT,
        "bundle_manifest_sha256": bundle_manifest_sha256,
        "bundle": bundle_manifest_sha256[:5],
        "watermark": watermark or {"embedded": False},
    }


def container_tags(record: dict) -> dict[str, str]:
    """Container metadata (PyAV ``container.metadata``) for ``record``."""
    return {"comment": json.dumps(record, sort_keys=True, separators=(",", ":")), "description": f"{STATEMENT} (bundle {record['bundle']})"}


def read_tags(path: str | Path) -> dict | None:
    """The provenance record in a file's container tags, or None."""
    import av

    with av.open(str(path)) as c:
        meta = {k.lower(): v for k, v in c.metadata.items()}
    raw = meta.get("comment")
    if not raw:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and rec.get("generator") == GENERATOR else None


# ------------------------------------------------------------------------------------------------ C2PA


def c2pa_dir() -> Path:
    d = os.environ.get("AVATAR_C2PA_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "avatar-engine" / "c2pa"


def _local_credentials(d: Path) -> tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM): a local CA and an ES256 signer certificate it issued,
    made once (C2PA refuses a self-signed end-entity certificate, hence the two)."""
    chain_p, key_p = d / "signer_chain.pem", d / "signer_key.pem"
    if chain_p.exists() and key_p.exists():
        return chain_p.read_bytes(), key_p.read_bytes()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "avatar-engine (local, untrusted)")])

    now = datetime.datetime.now(datetime.timezone.utc)
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("avatar-engine local CA")).issuer_name(name("avatar-engine local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **usage), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("avatar-engine local signer")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the key readable by its owner only
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    chain_p.write_bytes(chain)
    log.info("C2PA: made a local signing certificate in %s (untrusted by validators; see engine/provenance/metadata.py)", d)
    return chain, key_pem


def _credentials() -> tuple[bytes, bytes]:
    cert, key = os.environ.get("AVATAR_C2PA_CERT"), os.environ.get("AVATAR_C2PA_KEY")
    if cert and key:
        return Path(cert).read_bytes(), Path(key).read_bytes()
    return _local_credentials(c2pa_dir())


def c2pa_manifest(record: dict, title: str) -> dict:
    return {
        "claim_generator_info": [{"name": GENERATOR, "version": record.get("generator_version", "")}],
        "title": title,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": {"name": GENERATOR, "version": record.get("generator_version", "")},
                "description": STATEMENT}]}},
            {"label": ASSERTION_LABEL, "data": record},
        ],
    }


def sign_c2pa(path: str | Path, record: dict, *, title: str | None = None) -> str:
    """Embed a signed C2PA manifest into ``path`` (in place). Returns "signed", or why not (c2pa-python
    missing, a signing error): the file is then left as it was and the tags still tell."""
    path = Path(path)
    mime = MIME.get(path.suffix.lower())
    if mime is None:
        return f"not signed: C2PA embedding for {path.suffix or 'this file type'} is not supported"
    try:
        import c2pa
    except ImportError:
        return "not signed: c2pa-python is not installed (pip install c2pa-python)"
    tmp = path.with_name(path.name + ".c2pa" + path.suffix)
    try:
        chain, key = _credentials()
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, key, None))
        builder = c2pa.Builder.from_json(json.dumps(c2pa_manifest(record, title or path.name)))
        with open(path, "rb") as src, open(tmp, "w+b") as dst:
            builder.sign(signer, mime, src, dst)
        tmp.replace(path)
        return "signed"
    except Exception as e:  # c2pa.C2paError, OSError, a bad user certificate: the render stands without it
        log.warning("C2PA signing failed (%s); the file keeps its container tags only", e)
        return f"not signed: {type(e).__name__}: {e}"
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class C2paInfo:
    present: bool  # a C2PA manifest store is in the file
    signature_valid: bool = False  # the claim's signature verifies and the hashes match the bytes
    trusted: bool = False  # the signer's certificate chains to a trust anchor the reader knows
    generator: str | None = None  # the claim generator's name
    record: dict | None = None  # our provenance assertion, if present
    ai_generated: bool = False  # a c2pa.created action with digitalSourceType trainedAlgorithmicMedia
    problems: list[str] = field(default_factory=list)  # failure codes the validator reported

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("present", "signature_valid", "trusted", "generator", "ai_generated", "record", "problems")}


def read_c2pa(path: str | Path) -> C2paInfo:
    """Read and validate the C2PA manifest of ``path`` (absent: ``present=False``)."""
    path = Path(path)
    mime = MIME.get(path.suffix.lower(), "video/mp4")
    try:
        import c2pa
    except ImportError:
        return C2paInfo(False, problems=["c2pa-python is not installed: C2PA manifests not checked"])
    try:
        with open(path, "rb") as f:
            reader = c2pa.Reader(mime, f)
            data = json.loads(reader.json())
    except Exception as e:  # no manifest (ManifestNotFound), a container C2PA does not cover (webm), or not parseable
        if "ManifestNotFound" in type(e).__name__ or "no JUMBF" in str(e) or "not found" in str(e).lower():
            return C2paInfo(False)
        if "NotSupported" in type(e).__name__:
            return C2paInfo(False, problems=[f"C2PA does not cover {path.suffix or 'this'} files"])
        return C2paInfo(False, problems=[f"{type(e).__name__}: {e}"])
    active = data.get("manifests", {}).get(data.get("active_manifest", ""), {})
    info = C2paInfo(True)
    gens = active.get("claim_generator_info") or []
    info.generator = (gens[0].get("name") if gens else None) or active.get("claim_generator")
    for a in active.get("assertions", []):
        label = a.get("label", "")
        if label == ASSERTION_LABEL:
            info.record = a.get("data")
        if label.startswith("c2pa.actions"):
            for act in a.get("data", {}).get("actions", []):
                if act.get("action") == "c2pa.created" and act.get("digitalSourceType") == TRAINED_ALGORITHMIC_MEDIA:
                    info.ai_generated = True
    results = (data.get("validation_results") or {}).get("activeManifest") or {}
    failures = [s.get("code", "") for s in results.get("failure", [])]
    statuses = [s.get("code", "") for s in data.get("validation_status", [])]
    info.trusted = "signingCredential.trusted" in [s.get("code") for s in results.get("success", [])]
    info.problems = [c for c in failures + statuses if c != "signingCredential.untrusted"]
    success = [s.get("code") for s in results.get("success", [])]
    info.signature_valid = "claimSignature.validated" in success and not info.problems
    return info
