"""Validates documents against the official hypeman SDK's models (PyPI
`hypeman`), as an SDK client parsing our JSON would.

Input: a file of JSON lines, each {"model": M, "what": TEXT, "doc": DOC}, M one
of Device, DeviceList, AvailableList, GPUResourceStatus (issue 26). Prints one line per document that does
not validate, and a summary; exits 1 if any failed.
"""
import json
import sys
from typing import List

from pydantic import TypeAdapter, ValidationError

from hypeman.types import AvailableDevice, Device, GPUResourceStatus

MODELS = {
    "Device": TypeAdapter(Device),
    "DeviceList": TypeAdapter(List[Device]),
    "AvailableList": TypeAdapter(List[AvailableDevice]),
    "GPUResourceStatus": TypeAdapter(GPUResourceStatus),
}

failed = 0
checked = 0
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        entry = json.loads(line)
        checked += 1
        try:
            MODELS[entry["model"]].validate_python(entry["doc"])
        except ValidationError as e:
            failed += 1
            errors = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
            )
            print(f"INVALID {entry['what']}: {errors}")
print(f"checked {checked} documents, {failed} invalid")
sys.exit(1 if failed else 0)
