"""Reading a SentencePiece `tokenizer.model` (a protobuf ModelProto) without the protobuf library.

Only the vocabulary is read: ModelProto field 1 is the repeated SentencePiece message, whose fields
are 1 = piece (string), 2 = score (float) and 3 = type (enum). SentencePiece's type enum already
uses GGUF's token-type numbering (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte),
so the result can go straight into `tokenizer.ggml.tokens/scores/token_type`.
"""
import struct
from pathlib import Path

from ..errors import TokenizerError

# Protobuf wire types.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5

_MODEL_PIECES = 1
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_NORMAL = 1   # protobuf default of SentencePiece.type when the field is absent


def read_spm_model(path):
    """Return (tokens, scores, token_types) of a SentencePiece model file, in id order."""
    data = Path(path).read_bytes()
    tokens, scores, types = [], [], []
    try:
        for field, wire_type, value in _fields(data, 0, len(data)):
            if field == _MODEL_PIECES and wire_type == _LENGTH_DELIMITED:
                text, score, token_type = _piece(data, *value)
                tokens.append(text)
                scores.append(score)
                types.append(token_type)
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise TokenizerError(f"{path}: not a valid SentencePiece model ({exc})") from None
    if not tokens:
        raise TokenizerError(f"{path}: SentencePiece model holds no pieces")
    return tokens, scores, types


def _piece(data, start, end):
    text, score, token_type = None, 0.0, _NORMAL
    for field, wire_type, value in _fields(data, start, end):
        if field == _PIECE_TEXT and wire_type == _LENGTH_DELIMITED:
            text = data[value[0]:value[1]].decode("utf-8")
        elif field == _PIECE_SCORE and wire_type == _FIXED32:
            score = struct.unpack_from("<f", data, value)[0]
        elif field == _PIECE_TYPE and wire_type == _VARINT:
            token_type = value
    if text is None:
        raise ValueError(f"a piece at byte {start} has no text")
    return text, score, token_type


def _fields(data, pos, end):
    """Yield (field number, wire type, value) for each field of the message in data[pos:end].

    value is an int for varints, (start, end) for length-delimited fields, and the byte offset of
    the payload for fixed-width fields.
    """
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _varint(data, pos)
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError(f"field {field} at byte {pos} runs past the end of its message")
            value, pos = (pos, pos + length), pos + length
        elif wire_type == _FIXED32:
            value, pos = pos, pos + 4
        elif wire_type == _FIXED64:
            value, pos = pos, pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} at byte {pos}")
        if pos > end:
            raise ValueError(f"field {field} runs past the end of its message")
        yield field, wire_type, value


def _varint(data, pos):
    result, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"varint longer than 10 bytes at byte {pos}")
