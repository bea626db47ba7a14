"""Protobuf messages for TIDL's prototxt files, defined in code (no protoc at run time).

TI publishes the formats as documents and examples, not as .proto files we can ship,
so each module that writes a prototxt lists its messages' fields here in a compact
form; text format reads and writes by field name, so the numbers only need to be
unique within a message.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, message_factory, text_format
from google.protobuf.message import Message

F = descriptor_pb2.FieldDescriptorProto
# (name, number, type, label, message or enum type name or None)
Field = tuple[str, int, int, int, str | None]


def message_classes(
    package: str, messages: dict[str, list[Field]], enums: dict[str, dict[str, int]] | None = None
) -> dict[str, type[Message]]:
    """The message classes of a proto2 file of `messages` and `enums`, keyed by their bare names."""
    file = descriptor_pb2.FileDescriptorProto(name=f"edgequant_{package}.proto", package=package, syntax="proto2")
    for name, values in (enums or {}).items():
        enum = file.enum_type.add(name=name)
        for value_name, number in values.items():
            enum.value.add(name=value_name, number=number)
    for name, fields in messages.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".{package}.{type_name}"
            if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT) and label == F.LABEL_REPEATED:
                field.options.packed = True
    classes = message_factory.GetMessages([file])
    return {name: classes[f"{package}.{name}"] for name in messages}


def to_text(message: Message) -> str:
    """The message in protobuf text format, as TIDL reads it."""
    return text_format.MessageToString(message)


def parse(text: str, cls: type[Message]) -> Message:
    """A prototxt read back into a message of `cls`."""
    return text_format.Parse(text, cls())
