from support import balance_of, request_for, transfer


async def test_accepted_request_debits_the_total(client, make_account, pool):
    account = await make_account(10_000)
    response = await client.post("/bulk_transfer", json=request_for(account, [transfer("14.5"), transfer("0.29")]))
    assert response.status == 201
    body = await response.json()
    assert body["total_cents"] == 1479
    assert await balance_of(pool, account) == 10_000 - 1479
