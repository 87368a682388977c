"""Command sets: what we parse from requests and write in responses agrees with pydicom's reading of them."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from scp import dimse


def encode(command: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, command)
    return buffer.getvalue()


def store_request() -> Dataset:
    command = Dataset()
    command.CommandGroupLength = 0
    command.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    command.CommandField = 0x0001
    command.MessageID = 7
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = "1.2.3.4"
    return command


def test_store_request_is_parsed() -> None:
    parsed = dimse.parse_command(encode(store_request()))
    assert parsed == dimse.Command(0x0001, 7, True, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")


def test_response_reads_back_with_pydicom() -> None:
    raw = dimse.response(dimse.parse_command(encode(store_request())), 0xA700, "store is full")
    buffer = DicomBytesIO(raw)
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    response = read_dataset(buffer, is_implicit_VR=True, is_little_endian=True)
    assert response.CommandGroupLength == len(raw) - 12
    assert response.CommandField == 0x8001
    assert response.MessageIDBeingRespondedTo == 7
    assert response.Status == 0xA700
    assert response.ErrorComment == "store is full"
    assert response.AffectedSOPInstanceUID == "1.2.3.4"
    assert response.CommandDataSetType == 0x0101


def test_echo_response_has_no_instance() -> None:
    echo = Dataset()
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo.CommandField = 0x0030
    echo.MessageID = 1
    echo.CommandDataSetType = 0x0101
    parsed = dimse.parse_command(encode(echo))
    assert not parsed.has_data_set
    assert b"\x00\x00\x00\x10" not in dimse.response(parsed, 0)  # no (0000,1000)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x01",  # header cut short
        b"\x00\x00\x00\x01\x02\x00\x00\x00\x30",  # value runs past the end
        b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00",  # no Command Field
        b"\x00\x00\x00\x01\x04\x00\x00\x00\x01\x00\x00\x00",  # Command Field is not a US
    ],
)
def test_malformed_command_sets_are_refused(raw: bytes) -> None:
    with pytest.raises(dimse.MalformedCommand):
        dimse.parse_command(raw)


def test_the_health_check_echo_request_and_the_status_of_a_response() -> None:
    from scp import dimse

    request = dimse.parse_command(dimse.echo_request(message_id=7))
    assert (request.command_field, request.message_id, request.has_data_set) == (dimse.C_ECHO_RQ, 7, False)
    assert request.affected_sop_class_uid == "1.2.840.10008.1.1"
    assert dimse.response_status(dimse.response(request, 0x0000)) == 0x0000
    assert dimse.response_status(dimse.response(request, 0xA700, "retry later")) == 0xA700
    assert dimse.response_status(dimse.echo_request(message_id=1)) is None
    assert dimse.response_status(b"\x00\x00\x09\x00\x02\x00") is None  # truncated
