"""Checks of the JSON that Triton's HTTP API parses, made before tritonserver sees it (flux2_serving/server/gate.py).

tritonserver 2.51 parses request JSON with a recursive parser and no depth limit: 200,000 nested
`[` in a 400 KB body crash it (SIGSEGV). It also answers HTTP 500 to well-formed JSON of the wrong
shape (a height of "abc", a negative shape, a `timeout` of -1, data that does not fill the shape).
So the gate parses the JSON part of every body itself (Python's parser raises RecursionError
instead of crashing), bounds its depth, and checks an inference request against the KServe v2
schema (https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol and
Triton's binary-data extension): every refusal is one line naming the field and the rule.
Standard library only.
"""

from __future__ import annotations

import json
import math

MAX_DEPTH = 32  # a KServe request nests 5 deep plus a tensor's rank (data may be nested per shape axis)
MAX_RANK = 16
MAX_DIM = 2**40  # no sane tensor has more elements along one axis; keeps the products exact and small
# Element sizes of Triton's fixed-size types; BYTES is variable (a 4-byte length before each element).
ELEMENT_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
                 "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
DATATYPES = (*ELEMENT_BYTES, "BYTES")
INT_RANGES = {name: ((0, 2 ** (8 * size) - 1) if name.startswith("U") else
                     (-(2 ** (8 * size - 1)), 2 ** (8 * size - 1) - 1))
              for name, size in ELEMENT_BYTES.items() if "INT" in name}
# Request parameters that Triton itself reads, and the JSON type each must have.
UNSIGNED_PARAMETERS = ("priority", "timeout", "sequence_id")
BOOL_PARAMETERS = ("sequence_start", "sequence_end", "binary_data_output")


class BadJson(ValueError):
    """The body is refused: HTTP 400 with this one-line message."""


def parse(text: bytes, what: str = "request body") -> object:
    """`text` parsed as JSON, refused when it is not JSON, not UTF-8 or nested deeper than MAX_DEPTH."""
    try:
        document = json.loads(text)
    except RecursionError:
        raise BadJson(f"the {what} is nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError as exc:
        raise BadJson(f"the {what} is not UTF-8 (byte {exc.start})") from None
    except ValueError as exc:  # json.JSONDecodeError: message with line and column
        raise BadJson(f"the {what} is not valid JSON: {exc}") from None
    if depth(document) > MAX_DEPTH:
        raise BadJson(f"the {what} is nested deeper than {MAX_DEPTH} levels")
    return document


def depth(document) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, todo = 0, [(document, 1)]
    while todo:
        value, level = todo.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            todo.extend((item, level + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise BadJson(f"'{where}' must be a JSON object")
    return value


def _parameters(value, where: str) -> dict:
    parameters = _object(value, where)
    for key, item in parameters.items():
        if not isinstance(item, bool | int | float | str):
            raise BadJson(f"'{where}.{key}' must be a boolean, a number or a string")
    return parameters


def check_infer(request, binary_bytes: int) -> None:
    """Refuse an inference request (the JSON part) that Triton would answer with a 500 or misread.
    `binary_bytes`: bytes after the JSON part (Triton's binary tensor extension)."""
    request = _object(request, "request")
    unknown = set(request) - {"id", "parameters", "inputs", "outputs"}
    if unknown:
        raise BadJson(f"unknown field '{sorted(unknown)[0]}' in the request (KServe v2: id, parameters, inputs, "
                      "outputs)")
    if "id" in request and not isinstance(request["id"], str):
        raise BadJson("'id' must be a string")
    parameters = _parameters(request.get("parameters", {}), "parameters")
    for name in UNSIGNED_PARAMETERS:
        if name in parameters and not (_is_int(parameters[name]) and 0 <= parameters[name] < 2**64):
            raise BadJson(f"'parameters.{name}' must be an integer >= 0, got {json.dumps(parameters[name])}")
    for name in BOOL_PARAMETERS:
        if name in parameters and not isinstance(parameters[name], bool):
            raise BadJson(f"'parameters.{name}' must be true or false")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadJson("'inputs' must be a non-empty list of tensors")
    declared = sum(_check_input(tensor, i) for i, tensor in enumerate(inputs))
    if declared != binary_bytes:
        raise BadJson(f"the inputs' binary_data_size add up to {declared} bytes, but {binary_bytes} bytes "
                      "follow the JSON header")
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list):
        raise BadJson("'outputs' must be a list")
    for index, output in enumerate(outputs):
        where = f"outputs[{index}]"
        output = _object(output, where)
        if not isinstance(output.get("name"), str) or not output["name"]:
            raise BadJson(f"'{where}.name' must be a non-empty string")
        out_parameters = _parameters(output.get("parameters", {}), f"{where}.parameters")
        if "binary_data" in out_parameters and not isinstance(out_parameters["binary_data"], bool):
            raise BadJson(f"'{where}.parameters.binary_data' must be true or false")
        if "class_count" in out_parameters and not (_is_int(out_parameters["class_count"])
                                                    and out_parameters["class_count"] >= 0):
            raise BadJson(f"'{where}.parameters.class_count' must be an integer >= 0")


def _check_input(tensor, index: int) -> int:
    """Check one input tensor; returns its binary_data_size (0 for JSON data)."""
    where = f"inputs[{index}]"
    tensor = _object(tensor, where)
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise BadJson(f"'{where}.name' must be a non-empty string")
    where = f"input '{name}'"
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise BadJson(f"{where}: 'datatype' must be one of {', '.join(DATATYPES)}, got {json.dumps(datatype)}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise BadJson(f"{where}: 'shape' must be a list of at most {MAX_RANK} integers in [0, {MAX_DIM}]")
    count = math.prod(shape)
    parameters = _parameters(tensor.get("parameters", {}), f"{where} parameters")
    if "shared_memory_region" in parameters:
        raise BadJson(f"{where}: shared-memory inputs are not served here (the shared-memory API is closed)")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not _is_int(size) or size < 0:
            raise BadJson(f"{where}: 'binary_data_size' must be an integer >= 0")
        if "data" in tensor:
            raise BadJson(f"{where}: has both 'data' and 'binary_data_size'")
        if datatype != "BYTES" and size != count * ELEMENT_BYTES[datatype]:
            raise BadJson(f"{where}: shape {shape} of {datatype} is {count * ELEMENT_BYTES[datatype]} bytes, but "
                          f"binary_data_size is {size}")
        if datatype == "BYTES" and size < 4 * count:
            raise BadJson(f"{where}: {count} BYTES elements need at least {4 * count} bytes (a 4-byte length each), "
                          f"binary_data_size is {size}")
        return size
    if "data" not in tensor:
        raise BadJson(f"{where}: needs 'data' or parameters.binary_data_size")
    values = _flatten(tensor["data"], where)
    if len(values) != count:
        raise BadJson(f"{where}: shape {shape} holds {count} elements, 'data' has {len(values)}")
    for value in values:
        _check_element(value, datatype, where)
    return 0


def _flatten(data, where: str) -> list:
    if not isinstance(data, list):
        raise BadJson(f"{where}: 'data' must be a list")
    flat, todo = [], [data]
    while todo:  # depth is bounded by parse(); no recursion all the same
        value = todo.pop()
        if isinstance(value, list):
            todo.extend(reversed(value))
        else:
            flat.append(value)
    return flat


def _check_element(value, datatype: str, where: str) -> None:
    if datatype == "BYTES":
        ok = isinstance(value, str)
    elif datatype == "BOOL":
        ok = isinstance(value, bool)
    elif datatype in INT_RANGES:
        low, high = INT_RANGES[datatype]
        ok = _is_int(value) and low <= value <= high
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        wanted = {"BYTES": "strings", "BOOL": "true or false"}.get(
            datatype, f"integers in [{INT_RANGES[datatype][0]}, {INT_RANGES[datatype][1]}]" if datatype in INT_RANGES
            else "finite numbers")
        raise BadJson(f"{where}: {datatype} data must be {wanted}, got {json.dumps(value)[:40]}")
