"""Minimal CRI ImageService client for containerd's unix socket.

It calls the `runtime.v1.ImageService` methods that kubelet calls, so a pull
goes through the CRI plugin, its `k8s.io` namespace and its registry
config_path, unlike `ctr images pull`. The protobuf messages are encoded by
hand for the fields used here; field numbers follow
k8s.io/cri-api/pkg/apis/runtime/v1/api.proto.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

SERVICE = "runtime.v1.ImageService"
DEFAULT_TIMEOUT_SECONDS = 120.0

_WIRE_VARINT = 0
_WIRE_FIXED64 = 1
_WIRE_LENGTH_DELIMITED = 2
_WIRE_FIXED32 = 5


class CriError(RuntimeError):
    """Failed CRI call, with its gRPC status code and details."""

    def __init__(self, method: str, image: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"CRI {method} of {image!r} failed: {code.name}: {details}")
        self.method = method
        self.image = image
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Image:
    """The fields of a CRI Image message that this client decodes."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int
    pinned: bool


def _encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"negative varint {value}: this encoder handles unsigned values only")
    output = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            output.append(byte | 0x80)
        else:
            output.append(byte)
            return bytes(output)


def _encode_key(field_number: int, wire_type: int) -> bytes:
    return _encode_varint(field_number << 3 | wire_type)


def _encode_bytes_field(field_number: int, payload: bytes) -> bytes:
    return (
        _encode_key(field_number, _WIRE_LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload
    )


def _encode_string_field(field_number: int, text: str) -> bytes:
    return _encode_bytes_field(field_number, text.encode())


def _encode_bool_field(field_number: int, value: bool) -> bytes:
    # proto3 leaves fields at their default value out of the encoding.
    if not value:
        return b""
    return _encode_key(field_number, _WIRE_VARINT) + _encode_varint(1)


def _decode_varint(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if position >= len(data):
            raise ValueError("truncated varint in protobuf message")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _decode_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) for each field of a protobuf message.

    A varint value is an int and a length-delimited value is bytes. Fixed
    32-bit and 64-bit values are yielded as raw bytes.
    """
    position = 0
    while position < len(data):
        key, position = _decode_varint(data, position)
        field_number, wire_type = key >> 3, key & 0x7
        if wire_type == _WIRE_VARINT:
            value, position = _decode_varint(data, position)
            yield field_number, value
        elif wire_type == _WIRE_LENGTH_DELIMITED:
            length, position = _decode_varint(data, position)
            end = position + length
            if end > len(data):
                raise ValueError("truncated length-delimited field in protobuf message")
            yield field_number, data[position:end]
            position = end
        elif wire_type == _WIRE_FIXED64:
            yield field_number, data[position : position + 8]
            position += 8
        elif wire_type == _WIRE_FIXED32:
            yield field_number, data[position : position + 4]
            position += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} in field {field_number}")


def _encode_image_spec(image: str) -> bytes:
    # ImageSpec: string image = 1.
    return _encode_string_field(1, image)


def _decode_image(data: bytes) -> Image:
    # Image: string id = 1; repeated string repo_tags = 2;
    # repeated string repo_digests = 3; uint64 size = 4; bool pinned = 8.
    image_id = ""
    repo_tags: list[str] = []
    repo_digests: list[str] = []
    size = 0
    pinned = False
    for field_number, value in _decode_fields(data):
        if field_number == 1 and isinstance(value, bytes):
            image_id = value.decode()
        elif field_number == 2 and isinstance(value, bytes):
            repo_tags.append(value.decode())
        elif field_number == 3 and isinstance(value, bytes):
            repo_digests.append(value.decode())
        elif field_number == 4 and isinstance(value, int):
            size = value
        elif field_number == 8 and isinstance(value, int):
            pinned = bool(value)
    return Image(
        id=image_id,
        repo_tags=tuple(repo_tags),
        repo_digests=tuple(repo_digests),
        size=size,
        pinned=pinned,
    )


def _identity(data: bytes) -> bytes:
    return data


class ImageServiceClient:
    """CRI ImageService client on the containerd socket at SOCKET_PATH."""

    def __init__(self, socket_path: str | Path, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.socket_path = Path(socket_path).resolve()
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{self.socket_path}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ImageServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, image: str, request: bytes) -> bytes:
        stub = self._channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        try:
            response: bytes = stub(request, timeout=self.timeout)
            return response
        except grpc.RpcError as error:
            raise CriError(method, image, error.code(), error.details() or "") from error

    def pull_image(self, image: str) -> str:
        """Pull IMAGE through the CRI plugin and return the image ref (the image id)."""
        # PullImageRequest: ImageSpec image = 1. No auth, no sandbox config.
        response = self._call("PullImage", image, _encode_bytes_field(1, _encode_image_spec(image)))
        # PullImageResponse: string image_ref = 1.
        for field_number, value in _decode_fields(response):
            if field_number == 1 and isinstance(value, bytes):
                return value.decode()
        return ""

    def image_status(self, image: str) -> Image | None:
        """Return the status of IMAGE, or None when the CRI plugin does not have it."""
        # ImageStatusRequest: ImageSpec image = 1; bool verbose = 2.
        request = _encode_bytes_field(1, _encode_image_spec(image)) + _encode_bool_field(2, False)
        response = self._call("ImageStatus", image, request)
        # ImageStatusResponse: Image image = 1, absent when not found.
        for field_number, value in _decode_fields(response):
            if field_number == 1 and isinstance(value, bytes):
                return _decode_image(value)
        return None

    def remove_image(self, image: str) -> None:
        """Remove IMAGE; removing an image that is not present succeeds."""
        # RemoveImageRequest: ImageSpec image = 1.
        self._call("RemoveImage", image, _encode_bytes_field(1, _encode_image_spec(image)))

    def list_images(self) -> list[Image]:
        """Return every image of the CRI plugin."""
        # ListImagesRequest with no filter; ListImagesResponse: repeated Image images = 1.
        response = self._call("ListImages", "", b"")
        return [
            _decode_image(value)
            for field_number, value in _decode_fields(response)
            if field_number == 1 and isinstance(value, bytes)
        ]
