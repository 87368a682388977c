"""AWS HealthImaging's import API as a per-request responder on real boto3 clients, checked against botocore's model.

Like botocore's Stubber, it answers inside the client (``before-call``), after botocore has validated the request
against the medical-imaging model, and every answer is validated against the operation's output shape; errors are
the operation's modelled errors with their modelled HTTP status. Unlike the Stubber, it needs no script of the
calls to come: it keeps import jobs as the service does (one job per client token, SUBMITTED, IN_PROGRESS,
COMPLETED or FAILED) and writes each job's output files (job-output-manifest.json, SUCCESS/, FAILURE/, WARNING/)
under ``<outputS3Uri><datastoreId>-DicomImport-<jobId>/``. What it imports is kept as the truth a test compares the
product's records with. SearchImageSets (by Series Instance UID) and GetImageSetMetadata answer from what the data
store holds: what its jobs imported and what StoreDICOM's stand-in stored (``hold``). Faults are drawn from a
seeded random generator at the rates a test gives.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.awsrequest import AWSResponse
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from botocore.model import OperationModel
from botocore.response import StreamingBody
from botocore.validate import validate_parameters

ENDPOINT = "https://medical-imaging.us-east-1.amazonaws.com"


@dataclass(frozen=True)
class Rates:
    """Per-request and per-file fault probabilities."""

    throttling: float = 0.0  # ThrottlingException on a call
    server_error: float = 0.0  # InternalServerException on a call
    transport: float = 0.0  # a read timeout (after the service acted) or a connection error (before)
    late_output: float = 0.0  # a COMPLETED job's output files appear only some seconds later
    # ... or only 70-100 s later, after the workflow (its retries 20 times as fast) has stopped waiting for them
    very_late_output: float = 0.0
    file_server_error: float = 0.0  # one file of a job fails with InternalServerException (worth a retry)
    customer_error: float = 0.0  # an instance HealthImaging refuses (ValidationException), in every job
    non_primary: float = 0.0  # an instance whose metadata conflicts: imported into a non-primary image set
    warning: float = 0.0  # an instance imported with a warning (0xB000 coercion)
    job_failed: float = 0.0  # a whole job FAILED (nothing imported)


@dataclass
class Job:
    job_id: str
    token: str
    name: str
    input_uri: str
    output_uri: str
    role: str
    submitted_at: datetime
    status: str = "SUBMITTED"
    polls: int = 0
    ended_at: datetime | None = None
    message: str | None = None
    output_written: bool = False


@dataclass(frozen=True)
class Refusal:
    """A file of an import job's input that the job failed: its failure line's exception."""

    job_id: str
    exception_type: str
    message: str


@dataclass
class Imported:
    image_set_id: str
    is_primary: bool
    jobs: list[str] = field(default_factory=list)


class HealthImaging:
    """One data store's import API; ``attach`` a medical-imaging client to have it answered here."""

    def __init__(self, s3: Any, datastore_id: str, rates: Rates, rng: random.Random) -> None:
        self._s3 = s3
        self.datastore_id = datastore_id
        self._rates = rates
        self._rng = rng
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._by_token: dict[str, str] = {}
        self.imported: dict[str, Imported] = {}  # the truth: SOP Instance UID -> where HealthImaging holds it
        self.refused: dict[str, dict[str, Refusal]] = {}  # SOP Instance UID -> job id -> that job's failure of it
        self.faults: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._timers: list[threading.Timer] = []
        self._bad: dict[str, str] = {}  # SOP Instance UID -> what is wrong with it, drawn once
        # What the data store holds, as its search and metadata see it: image set -> (study, isPrimary, updatedAt,
        # series UID -> SOP Instance UIDs), from the import jobs and from StoreDICOM.
        self._image_sets: dict[str, tuple[str, bool, datetime, dict[str, set[str]]]] = {}

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-parameter-build.medical-imaging", self._remember_parameters)
        client.meta.events.register("before-call.medical-imaging", self._answer)

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def hold(self, study: str, series: str, sop: str, image_set_id: str, primary: bool) -> None:
        """StoreDICOM stored an instance into this data store (tests/support/stow.py)."""
        with self._lock:
            self._hold(study, series, sop, image_set_id, primary)

    def _hold(self, study: str, series: str, sop: str, image_set_id: str, primary: bool) -> None:
        _, _, _, held = self._image_sets.get(image_set_id, (study, primary, datetime.now(UTC), {}))
        held.setdefault(series, set()).add(sop)
        self._image_sets[image_set_id] = (study, primary, datetime.now(UTC), held)

    def holders(self, sop_instance_uid: str) -> dict[str, bool]:
        """The image sets that hold an instance, by either path, with whether each is primary."""
        with self._lock:
            return {
                image_set_id: primary
                for image_set_id, (_, primary, _, held) in self._image_sets.items()
                if any(sop_instance_uid in sops for sops in held.values())
            }

    def problem(self, sop_instance_uid: str) -> str | None:
        """What is wrong with an instance ("customer", "nonprimary", "warning" or None): drawn once, so that
        StoreDICOM's stand-in of the same data store judges it as the import jobs do."""
        with self._lock:
            return self._problem(sop_instance_uid)

    # -- the responder ---------------------------------------------------------------------------------------

    @staticmethod
    def _remember_parameters(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["healthimaging_parameters"] = dict(params)

    def _answer(self, model: OperationModel, context: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        parameters = context["healthimaging_parameters"]
        handler: Callable[[dict[str, Any]], dict[str, Any]] = {
            "StartDICOMImportJob": self._start,
            "GetDICOMImportJob": self._get,
            "SearchImageSets": self._search,
            "GetImageSetMetadata": self._metadata,
        }[model.name]
        with self._lock:
            self.calls[model.name] += 1
            fault = self._draw_call_fault(model.name)
            if fault == "ConnectionError":
                raise EndpointConnectionError(endpoint_url=ENDPOINT)
            if fault in ("ThrottlingException", "InternalServerException"):
                return self._error(model, fault)
            response = handler(parameters)
        if fault == "ReadTimeout":
            # The request reached the service and it acted (a job was created); the answer is lost.
            raise ReadTimeoutError(endpoint_url=ENDPOINT)
        validate_parameters(response, model.output_shape)
        return AWSResponse(ENDPOINT, 200, {}, None), {**response, "ResponseMetadata": {"HTTPStatusCode": 200}}

    def _draw_call_fault(self, operation: str) -> str | None:
        draw = self._rng.random()
        rates = self._rates
        for name, rate in (
            ("ThrottlingException", rates.throttling),
            ("InternalServerException", rates.server_error),
            ("ReadTimeout", rates.transport / 2),
            ("ConnectionError", rates.transport / 2),
        ):
            if draw < rate:
                self.faults[f"{operation}:{name}"] += 1
                return name
            draw -= rate
        return None

    def _error(self, model: OperationModel, code: str) -> tuple[AWSResponse, dict[str, Any]]:
        shapes = {shape.name: shape for shape in model.error_shapes}
        assert code in shapes, f"{code} is not an error of {model.name} in the botocore model"
        status = int(shapes[code].metadata["error"]["httpStatusCode"])
        parsed = {
            "Error": {"Code": code, "Message": f"{code} (injected)"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        return AWSResponse(ENDPOINT, status, {}, None), parsed

    # -- the service -------------------------------------------------------------------------------------------

    def _start(self, parameters: dict[str, Any]) -> dict[str, Any]:
        assert parameters["datastoreId"] == self.datastore_id
        token = parameters["clientToken"]
        job_id = self._by_token.get(token)
        if job_id is None:
            job_id = uuid.uuid4().hex
            self._by_token[token] = job_id
            self._jobs[job_id] = Job(
                job_id,
                token,
                parameters.get("jobName", ""),
                parameters["inputS3Uri"],
                parameters["outputS3Uri"],
                parameters["dataAccessRoleArn"],
                datetime.now(UTC),
            )
        job = self._jobs[job_id]
        return {
            "datastoreId": self.datastore_id,
            "jobId": job.job_id,
            "jobStatus": job.status,
            "submittedAt": job.submitted_at,
        }

    def _get(self, parameters: dict[str, Any]) -> dict[str, Any]:
        job = self._jobs[parameters["jobId"]]
        job.polls += 1
        if job.status == "SUBMITTED":
            job.status = "IN_PROGRESS"
        elif job.status == "IN_PROGRESS" and job.polls >= 2:
            self._run(job)
        properties: dict[str, Any] = {
            "jobId": job.job_id,
            "jobName": job.name or job.job_id,
            "jobStatus": job.status,
            "datastoreId": self.datastore_id,
            "dataAccessRoleArn": job.role,
            "submittedAt": job.submitted_at,
            "inputS3Uri": job.input_uri,
            "outputS3Uri": job.output_uri,
        }
        if job.ended_at is not None:
            properties["endedAt"] = job.ended_at
        if job.message:
            properties["message"] = job.message
        return {"jobProperties": properties}

    def _search(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """The image sets holding a series; the product searches by DICOMSeriesInstanceUID EQUAL only."""
        assert parameters["datastoreId"] == self.datastore_id
        (search,) = parameters["searchCriteria"]["filters"]
        assert search["operator"] == "EQUAL", search
        ((attribute, series),) = search["values"][0].items()
        assert attribute == "DICOMSeriesInstanceUID", search
        summaries = [
            {"imageSetId": image_set_id, "version": 1, "createdAt": updated, "updatedAt": updated,
             "isPrimary": primary}
            for image_set_id, (_, primary, updated, held) in sorted(self._image_sets.items())
            if series in held
        ]  # fmt: skip
        return {"imageSetsMetadataSummaries": summaries}

    def _metadata(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """The image set's metadata document, gzip JSON: Study, Series by UID, Instances by SOP Instance UID."""
        assert parameters["datastoreId"] == self.datastore_id
        image_set_id = parameters["imageSetId"]
        study, _, _, held = self._image_sets[image_set_id]
        document = {
            "SchemaVersion": "1.1",
            "DatastoreID": self.datastore_id,
            "ImageSetID": image_set_id,
            "Study": {
                "DICOM": {"StudyInstanceUID": study},
                "Series": {
                    series: {"DICOM": {"SeriesInstanceUID": series}, "Instances": {sop: {} for sop in sorted(sops)}}
                    for series, sops in held.items()
                },
            },
        }
        blob = gzip.compress(json.dumps(document).encode())
        return {
            "imageSetMetadataBlob": StreamingBody(io.BytesIO(blob), len(blob)),
            "contentType": "application/json",
            "contentEncoding": "gzip",
        }

    def _run(self, job: Job) -> None:
        """Import every object under the input prefix as the service does, then finish the job."""
        bucket, prefix = _split(job.input_uri)
        keys = [
            entry["Key"]
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for entry in page.get("Contents", [])
        ]
        job.ended_at = datetime.now(UTC)
        if self._rng.random() < self._rates.job_failed:
            self.faults["job:FAILED"] += 1
            job.status, job.message = "FAILED", "Unable to read input: the import job failed (injected)"
            self._write_output(job, [], [], [])
            return
        success, failure, warning = [], [], []
        for key in keys:
            study, series, sop = _uids(key)
            problem = self._problem(sop)
            if problem == "customer":
                message = "PixelData length does not match its attributes (injected)"
                refusal = Refusal(job.job_id, "ValidationException", message)
            elif self._rng.random() < self._rates.file_server_error:
                self.faults["file:InternalServerException"] += 1
                refusal = Refusal(job.job_id, "InternalServerException", "internal error (injected)")
            else:
                refusal = None
            if refusal is not None:
                failure.append({"inputFile": key, "exception": {"exceptionType": refusal.exception_type,
                                                                  "message": refusal.message}})  # fmt: skip
                self.refused.setdefault(sop, {})[job.job_id] = refusal
                continue
            primary = problem != "nonprimary"
            image_set = _image_set(study, primary)
            success.append({"inputFile": key, "importResponse": {"imageSetId": image_set, "isPrimary": primary}})
            if problem == "warning":
                warning.append({"inputFile": key, "warning": {"warningReason": "0xB000",
                                                                "warningType": "COERCION_OF_DATA_ELEMENTS",
                                                                "message": "StudyDescription truncated"}})  # fmt: skip
            self._hold(study, series, sop, image_set, primary)
            record = self.imported.setdefault(sop, Imported(image_set, primary))
            record.jobs.append(job.job_id)
        job.status = "COMPLETED"
        draw, delay = self._rng.random(), None
        if draw < self._rates.very_late_output:
            self.faults["job:output after the workflow stopped waiting"] += 1
            delay = 70.0 + self._rng.random() * 30
        elif draw < self._rates.very_late_output + self._rates.late_output:
            self.faults["job:late output"] += 1
            delay = 1.0 + self._rng.random() * 3
        if delay is None:
            self._write_output(job, success, failure, warning)
            return
        timer = threading.Timer(delay, self._write_output, (job, success, failure, warning))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _problem(self, sop: str) -> str | None:
        """What is wrong with an instance, drawn once: the same data gets the same answer in every job."""
        if sop not in self._bad:
            draw, rates = self._rng.random(), self._rates
            if draw < rates.customer_error:
                self._bad[sop] = "customer"
            elif draw < rates.customer_error + rates.non_primary:
                self._bad[sop] = "nonprimary"
            elif draw < rates.customer_error + rates.non_primary + rates.warning:
                self._bad[sop] = "warning"
            else:
                self._bad[sop] = ""
        return self._bad[sop] or None

    def _write_output(self, job: Job, success: list[Any], failure: list[Any], warning: list[Any]) -> None:
        bucket, prefix = _split(job.output_uri)
        folder = f"{prefix}{self.datastore_id}-DicomImport-{job.job_id}/"
        summary = {
            "jobSummary": {
                "jobId": job.job_id,
                "datastoreId": self.datastore_id,
                "inputS3Uri": job.input_uri,
                "outputS3Uri": f"s3://{bucket}/{folder}",
                "numberOfScannedFiles": len(success) + len(failure),
                "numberOfImportedFiles": len(success),
                "numberOfFilesWithCustomerError": sum(
                    1 for line in failure if line["exception"]["exceptionType"] != "InternalServerException"
                ),
                "numberOfFilesWithServerError": sum(
                    1 for line in failure if line["exception"]["exceptionType"] == "InternalServerException"
                ),
            }
        }
        for name, lines in (("SUCCESS/success.ndjson", success), ("FAILURE/failure.ndjson", failure),
                            ("WARNING/warning.ndjson", warning)):  # fmt: skip
            body = "".join(json.dumps(line) + "\n" for line in lines).encode()
            self._s3.put_object(Bucket=bucket, Key=folder + name, Body=body)
        # The manifest last: its presence says the job's output is complete.
        self._s3.put_object(Bucket=bucket, Key=folder + "job-output-manifest.json", Body=json.dumps(summary).encode())
        job.output_written = True


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _uids(key: str) -> tuple[str, str, str]:
    parts = key.split("/")
    return parts[-3], parts[-2], parts[-1][: -len(".dcm")]


def _image_set(study: str, primary: bool) -> str:
    """Instances of a study share its primary image set; a conflicting one lands in a non-primary set of its own."""
    return hashlib.sha256(f"{study}:{primary}".encode()).hexdigest()[:32]

