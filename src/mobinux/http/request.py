"""Sans-I/O HTTP/1.x request-head parser (RFC 9112) and request-target decoding.

The parser never touches a socket: the server feeds it bytes with
:meth:`RequestParser.feed` and pulls complete request heads with
:meth:`RequestParser.next_request`. Anything that is not a well-formed request
head raises :class:`HttpError`, which carries the status code to answer with
(400, 414, 431 or 505); after an :class:`HttpError` the connection must be
closed, because the parser no longer knows where the next request starts.

Limits (why they exist):

* the request line may be at most :data:`MAX_REQUEST_LINE` bytes (414 beyond,
  RFC 9112 §3 recommends supporting at least 8000 octets);
* the whole head (request line + header fields) at most :data:`MAX_HEAD`
  bytes and :data:`MAX_HEADERS` fields (431 beyond, RFC 6585 §5): a client
  cannot make the server buffer without bound before it has a request.

The server only implements GET and HEAD, so request bodies are never read: a
request that announces one (``Content-Length`` > 0 or ``Transfer-Encoding``)
is flagged with :attr:`Request.has_body` and the server closes the connection
after answering it instead of guessing where the next request begins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mobinux.errors import MalformedPacket, PathRefused

MAX_HEAD = 16 * 1024
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADERS = 100

# token = 1*tchar (RFC 9110 §5.6.2)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# HTTP-version = "HTTP" "/" DIGIT "." DIGIT, case-sensitive (RFC 9112 §2.3)
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# field-value characters: VCHAR, obs-text, SP and HTAB (RFC 9110 §5.5); CR, LF,
# NUL and the other controls are refused rather than "repaired".
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# the request-target may only hold visible US-ASCII (RFC 9112 §3.2, RFC 3986 §2)
_TARGET = re.compile(r"[\x21-\x7e]+")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})?")
_ABSOLUTE = re.compile(r"(?i:https?)://[^/?#]*")
_DIGITS = re.compile(rb"[0-9]+")


class HttpError(MalformedPacket):
    """A request the server cannot parse; *status* is the reply to send before closing."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request head. Header names are lower-case, values stripped of OWS."""

    method: str
    target: str
    version: tuple[int, int]
    headers: tuple[tuple[str, str], ...]
    has_body: bool = False

    def values(self, name: str) -> list[str]:
        """Every value of header *name* (lower-case), in the order received."""
        return [value for key, value in self.headers if key == name]

    def get(self, name: str) -> str | None:
        """The value of header *name* when it appears exactly once, else None."""
        found = self.values(name)
        return found[0] if len(found) == 1 else None

    def tokens(self, name: str) -> set[str]:
        """Lower-cased comma-separated tokens of a list header such as Connection."""
        return {
            item.strip().lower()
            for value in self.values(name)
            for item in value.split(",")
            if item.strip()
        }

    @property
    def keep_alive(self) -> bool:
        """True when the connection may carry another request after this one.

        HTTP/1.1 persists unless ``Connection: close`` (RFC 9112 §9.3); HTTP/1.0
        persistence is an old extension this server does not offer: it closes.
        """
        if self.version < (1, 1):
            return False
        return "close" not in self.tokens("connection")


class RequestParser:
    """Incremental request-head parser: ``feed(bytes)``, then ``next_request()``."""

    __slots__ = ("_buf", "_max_head", "_max_line", "_scan", "_seen_line")

    def __init__(self, max_head: int = MAX_HEAD, max_line: int = MAX_REQUEST_LINE) -> None:
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already scanned: complete lines, no end of head
        self._seen_line = False  # a non-empty line (the request line) was among them
        self._max_head = max_head
        self._max_line = max_line

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed as part of a request head."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_request(self) -> Request | None:
        """The next complete request, None when more bytes are needed.

        Raises :class:`HttpError` when the buffered bytes cannot start a valid
        request; the caller must answer with ``error.status`` and close.
        """
        end = self._find_head_end()
        if end < 0:
            self._check_incomplete()
            return None
        if end > self._max_head:
            raise HttpError(431, "request head too large")
        head = bytes(self._buf[:end])
        del self._buf[:end]
        self._scan = 0
        self._seen_line = False
        return _parse_head(head, self._max_line)

    def _find_head_end(self) -> int:
        """Offset just past the blank line ending the head, or -1.

        Leading empty lines are skipped over (RFC 9112 §2.2: a server SHOULD
        ignore at least one empty line before the request-line). Scanning
        resumes where the previous call stopped, so feeding a head one byte at
        a time costs linear, not quadratic, time.
        """
        buf = self._buf
        pos = self._scan
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                self._scan = pos
                return -1
            line_end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
            if line_end > pos:
                self._seen_line = True
            elif self._seen_line:
                return nl + 1
            pos = nl + 1

    def _check_incomplete(self) -> None:
        if not self._seen_line and len(self._buf) - self._scan > self._max_line:
            # no request line yet, and the line being received is already too long
            raise HttpError(414, "request line too long")
        if len(self._buf) > self._max_head:
            raise HttpError(431, "request head too large")


def _parse_head(head: bytes, max_line: int) -> Request:
    lines = head.split(b"\n")
    # strip the CR of CRLF; a lone LF is accepted as a line end (RFC 9112 §2.2)
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    while lines and not lines[0]:
        lines.pop(0)
    request_line, fields = lines[0], [line for line in lines[1:] if line]
    if len(request_line) > max_line:
        raise HttpError(414, "request line too long")
    method, target, version = _parse_request_line(request_line)
    if len(fields) > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    headers = tuple(_parse_field(line) for line in fields)
    request = Request(method=method, target=target, version=version, headers=headers)
    return _check_framing(request)


def _parse_request_line(line: bytes) -> tuple[str, str, tuple[int, int]]:
    # request-line = method SP request-target SP HTTP-version (RFC 9112 §3);
    # exactly single spaces: anything else is a malformed line, not a guess.
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "malformed method")
    matched = _VERSION.fullmatch(version)
    if matched is None:
        raise HttpError(400, "malformed HTTP version")
    major, minor = int(matched.group(1)), int(matched.group(2))
    if major != 1:
        raise HttpError(505, "only HTTP/1.x is supported")
    # a higher HTTP/1.x minor version is answered as 1.1 (RFC 9110 §2.5)
    text = target.decode("latin-1")
    if not _TARGET.fullmatch(text):
        raise HttpError(400, "malformed request target")
    return method.decode("ascii"), text, (1, min(minor, 1))


def _parse_field(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        # obs-fold (RFC 9112 §5.2): a server may reject it with 400
        raise HttpError(400, "obsolete line folding")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        # also catches whitespace between name and colon (RFC 9112 §5.1)
        raise HttpError(400, "malformed header field")
    value = value.strip(b" \t")
    if _BAD_VALUE_BYTE.search(value):
        raise HttpError(400, "control character in header value")
    return name.decode("ascii").lower(), value.decode("latin-1")


def _check_framing(request: Request) -> Request:
    """Validate Host and the body framing headers (RFC 9112 §3.2, §6)."""
    if len(request.values("host")) > 1:
        raise HttpError(400, "more than one Host header")
    # A missing Host is tolerated: HTTP/1.1 requires it (RFC 9112 §3.2) but a
    # boot server gains nothing from refusing an old firmware client over it.
    has_body = False
    if request.values("transfer-encoding"):
        if request.values("content-length"):
            # both present is a request-smuggling vector (RFC 9112 §6.1)
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        has_body = True
    lengths = {
        item.strip() for value in request.values("content-length") for item in value.split(",")
    }
    if lengths:
        if len(lengths) != 1:
            raise HttpError(400, "conflicting Content-Length values")
        (length,) = lengths
        if not _DIGITS.fullmatch(length.encode("latin-1")):
            raise HttpError(400, "malformed Content-Length")
        has_body = int(length) > 0
    if has_body:
        return Request(
            method=request.method,
            target=request.target,
            version=request.version,
            headers=request.headers,
            has_body=True,
        )
    return request


def split_target(target: str) -> tuple[str, str]:
    """Split a request-target into its percent-decoded path and its raw query.

    Accepts origin-form (``/a/b?q``) and absolute-form
    (``http://host:port/a/b?q``, RFC 9112 §3.2.2: only the path is used, the
    authority is ignored). The path is decoded exactly once, so ``%252e``
    stays the literal file name ``%2e``. An encoded ``/`` (``%2F``) is refused
    with :class:`PathRefused`: a client has no honest reason to hide a
    separator, and refusing it keeps "what the client asked for" and "what
    :func:`mobinux.paths.normalise` sees" the same string. Encoded NUL and
    backslash are decoded and then refused by ``normalise``.

    The query string is returned still percent-encoded (without the ``?``);
    decoding it (``urllib.parse.parse_qs``) is the resolver's business.

    Raises :class:`HttpError` (400) for targets that are not URIs at all.
    """
    if not _TARGET.fullmatch(target):
        raise HttpError(400, "malformed request target")
    if not target.startswith("/"):
        matched = _ABSOLUTE.match(target)
        if matched is None:
            raise HttpError(400, "request target is neither origin- nor absolute-form")
        target = target[matched.end() :] or "/"
        if not target.startswith(("/", "?")):
            raise HttpError(400, "malformed absolute-form target")
        if target.startswith("?"):
            target = "/" + target
    if "#" in target:
        raise HttpError(400, "fragment in request target")
    raw_path, _, query = target.partition("?")
    return _percent_decode_path(raw_path), query


def _percent_decode_path(raw: str) -> str:
    out = bytearray()
    pos = 0
    for matched in _PERCENT.finditer(raw):
        out += raw[pos : matched.start()].encode("ascii")
        hexpair = matched.group(1)
        if hexpair is None:
            raise HttpError(400, "malformed percent-encoding")
        byte = int(hexpair, 16)
        if byte == 0x2F:
            raise PathRefused("encoded '/' in path")
        out.append(byte)
        pos = matched.end()
    out += raw[pos:].encode("ascii")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "path is not UTF-8") from None
