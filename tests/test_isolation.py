"""bps.bulk_transfer's duplicate and balance checks assume READ COMMITTED; any other level is refused."""

import json

import asyncpg
import pytest
from support import balance_of, request_for, transfer

from service import db


@pytest.mark.parametrize("isolation", ["repeatable_read", "serializable"])
async def test_bulk_transfer_refuses_to_run_above_read_committed(pool, make_account, isolation):
    account = await make_account(10_000)
    async with pool.acquire() as connection:
        with pytest.raises(asyncpg.InvalidTransactionStateError, match="READ COMMITTED"):
            async with connection.transaction(isolation=isolation):
                await connection.fetchrow(
                    "SELECT * FROM bps.bulk_transfer($1::jsonb)", json.dumps(request_for(account, [transfer("1")]))
                )
    assert await balance_of(pool, account) == 10_000


async def test_service_connections_run_at_read_committed_whatever_the_database_default(
    client, make_account, pool, database_url
):
    database = db.database_name(database_url)
    await pool.execute(f"ALTER DATABASE \"{database}\" SET default_transaction_isolation = 'repeatable read'")
    try:
        account = await make_account(10_000)
        response = await client.post("/bulk_transfer", json=request_for(account, [transfer("1")]))
        assert response.status == 201
    finally:
        await pool.execute(f'ALTER DATABASE "{database}" RESET default_transaction_isolation')
