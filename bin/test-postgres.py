"""Create or drop the fresh PostgreSQL database of one test run (used by bin/test).

    test-postgres.py create   -> prints the new database's URL; fails in one line if the server does not answer
    test-postgres.py drop URL
"""
import os
import sys
import time

import psycopg

ADMIN = os.environ.get("REPAIR_TEST_POSTGRES_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def admin():
    try:
        return psycopg.connect(ADMIN, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        sys.exit(f"bin/test: PostgreSQL does not answer at {ADMIN}: {str(exc).strip().splitlines()[0]} "
                 "(start it, or set REPAIR_TEST_POSTGRES_ADMIN to a server's admin URL)")


def main(argv):
    if argv[:1] == ["create"]:
        name = f"repair_test_{int(time.time())}_{os.getpid()}"
        with admin().cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        print(ADMIN.rsplit("/", 1)[0] + "/" + name)
    elif argv[:1] == ["drop"] and len(argv) == 2:
        with admin().cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{argv[1].rsplit("/", 1)[1]}" WITH (FORCE)')
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
