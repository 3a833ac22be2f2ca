"""Object storage and local paths behind one set of functions (`s3://bucket/key` or a path).

Owns URIs, transfers (trees uploaded with a marker file last), listing, the lease that gives a
run or sweep folder one writer (lease.py), the pyarrow filesystem Ray
writes its run state through, and local caches of remote inputs. The retry policy for storage
outages stays inside: callers pass `retry_s=OUTAGE_RETRY_S` and never see a retry loop. The only
package that imports boto3 and pyarrow.
"""

from tltrain.storage._retry import OUTAGE_RETRY_S
from tltrain.storage.cache import (
    DEFAULT_CACHE_DIR,
    cache_dir_for,
    fetch_weights,
    localize,
    localizer,
    weights_cache_path,
)
from tltrain.storage.lease import LEASE_FILE, Lease, LeaseHeld, LeaseInfo, holds_output, list_leases, read_lease
from tltrain.storage.lease import acquire as acquire_lease
from tltrain.storage.store import (
    download_file,
    download_tree,
    ensure_bucket,
    exists,
    file_sizes,
    is_s3,
    list_files,
    pyarrow_filesystem,
    read_files,
    s3_client,
    split_s3,
    upload_file,
    upload_tree,
)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "LEASE_FILE",
    "Lease",
    "LeaseHeld",
    "LeaseInfo",
    "acquire_lease",
    "list_leases",
    "read_lease",
    "OUTAGE_RETRY_S",
    "cache_dir_for",
    "download_file",
    "download_tree",
    "ensure_bucket",
    "exists",
    "holds_output",
    "fetch_weights",
    "is_s3",
    "file_sizes",
    "list_files",
    "localize",
    "localizer",
    "pyarrow_filesystem",
    "read_files",
    "s3_client",
    "split_s3",
    "upload_file",
    "upload_tree",
    "weights_cache_path",
]
