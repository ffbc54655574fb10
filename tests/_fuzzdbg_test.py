import collections, atexit
from typing import Any
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance
from tests.test_fuzz import schema, AUTH
C = collections.Counter()
def dump():
    with open("/tmp/fuzzstats.txt","w") as f:
        for k,v in sorted(C.items()): f.write(f"{k} {v}\n")
atexit.register(dump)
@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_x(case: Any) -> None:
    r = case.call(headers=AUTH)
    key = (case.operation.label, r.status_code, (r.json().get("error") or {}).get("code") if isinstance(r.json(), dict) else "?" if r.status_code>=400 and "json" in str(r.headers.get("content-type")) else "")
    C[key]+=1
    if r.status_code >= 500:
        with open("/tmp/fuzz500.txt","a") as f: f.write(f"{case.operation.label} {case.as_curl_command()}\n{r.text}\n")
