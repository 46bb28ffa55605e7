//! Several nodes' logs in one MySQL database (migration `20261206000008`): each node keeps its own
//! log (lsns and event seqs from 1, without a gap), its own journal lock, its own orders and stock
//! counters, while the claims stay global; and a single node's database keeps its data through the
//! migration. Nodes of several are opened in process with their `--node-id` set in the config (the
//! flag itself comes with the cluster work).

use crate::helpers::{start, wait_projected, Client, JsonBody, TestDatabase};
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use turnstile::domain::{Cents, Currency, CustomerId, IdempotencyKey, OrderId, Sku, Stock};
use turnstile::engine::order::{Order, OrderItem, OrderStatus};
use turnstile::engine::records::{Product, Record, State, StoredAnswer};
use turnstile::journal::mysql::{MySqlConfig, MySqlJournal, SchemaError};
use turnstile::journal::{Appended, Journal, JournalError};

/// The journal config of `node`, one node of several on `database` (its `--node-id`).
fn node_config(database: &TestDatabase, node: &str) -> MySqlConfig {
    let mut config = MySqlConfig::new(database.url.clone());
    config.node_id = Some(node.to_owned());
    config.node = node.to_owned();
    config
}

async fn open(config: MySqlConfig) -> (MySqlJournal, State) {
    MySqlJournal::open(config)
        .await
        .unwrap_or_else(|e| panic!("open the MySQL journal: {e}"))
}

fn sku(name: &str) -> Sku {
    Sku::parse(name).expect("sku")
}

fn product(name: &str, stock: i64) -> Record {
    Record::Product {
        product: Product {
            sku: sku(name),
            name: format!("product {name}"),
            price_cents: Cents::parse(100).expect("price"),
            currency: Currency::parse("EUR").expect("currency"),
            stock: Stock::parse(stock).expect("stock"),
            max_per_customer: None,
            admission_rate: None,
        },
    }
}

/// The record of a checkout under `key` (its order id derived from the key, as on every node)
/// that placed an order of `quantity` units of `sku_name`, now in `status`.
fn placed(
    key: &str,
    sku_name: &str,
    quantity: i64,
    status: OrderStatus,
    payment_id: &str,
) -> (OrderId, Record) {
    let now = turnstile::time::now_ms();
    let key = IdempotencyKey::parse(key).expect("key");
    let period = turnstile::payment::checkout_period(now, 24 * 3_600 * 1_000);
    let order_id = turnstile::payment::order_id_for(&key, period).expect("order id");
    let entered = match status {
        OrderStatus::Paid => vec![OrderStatus::Reserved, OrderStatus::Paid],
        other => vec![other],
    };
    let record = Record::Order {
        order: Order {
            order_id: order_id.clone(),
            status,
            customer_id: CustomerId::parse("customer-1").expect("customer"),
            items: vec![OrderItem {
                sku: sku(sku_name),
                quantity,
                unit_price_cents: Cents::parse(100).expect("price"),
            }],
            total_cents: 100 * quantity,
            currency: Currency::parse("EUR").expect("currency"),
            created_at_ms: now,
            hold_deadline_ms: now + 900_000,
            payment_id: Some(payment_id.to_owned()),
            payment_due: None,
        },
        previous: None,
        entered,
        at_ms: now,
        answer: Some((
            key,
            StoredAnswer {
                fingerprint: "f".repeat(64),
                status: 201,
                body: format!("{{\"order_id\":\"{}\"}}", order_id.as_str()),
                at_ms: now,
            },
        )),
        replaces_expired_key: false,
    };
    (order_id, record)
}

/// Appends `records` to `journal`, all sent before any is awaited (one group commit or a few).
async fn append_all(journal: &MySqlJournal, records: Vec<Record>) -> Vec<Appended> {
    let tickets: Vec<_> = records.into_iter().map(|r| journal.append(r)).collect();
    let mut appended = Vec::with_capacity(tickets.len());
    for ticket in tickets {
        appended.push(ticket.await.expect("the record is durable"));
    }
    appended
}

/// Per node: the lowest and highest of `column` in `table`, and how many rows.
async fn ranges(pool: &sqlx::MySqlPool, table: &str, column: &str) -> Vec<(String, i64, i64, i64)> {
    sqlx::query(&format!(
        "SELECT CAST(node AS CHAR), MIN({column}), MAX({column}), COUNT(*) FROM {table} \
         GROUP BY node ORDER BY node"
    ))
    .fetch_all(pool)
    .await
    .expect("read the ranges")
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
    .collect()
}

/// Each node's (reserved, sold) of `sku_name` in `inventory`.
async fn counters(pool: &sqlx::MySqlPool, sku_name: &str) -> Vec<(String, i64, i64)> {
    sqlx::query(
        "SELECT CAST(node AS CHAR), reserved, sold FROM inventory WHERE sku = ? ORDER BY node",
    )
    .bind(sku_name)
    .fetch_all(pool)
    .await
    .expect("read the stock counters")
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2)))
    .collect()
}

fn order_ids(state: &State) -> BTreeSet<String> {
    state
        .orders
        .keys()
        .map(|id| id.as_str().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_keep_their_own_logs_orders_and_stock_in_one_database() {
    // Proves: two nodes' journals are open on one database at once, each writing orders of one
    // SKU; each node's lsns and event seqs start at 1 and have no gap; a second journal under a
    // node's name is refused while that node runs; each node, restarted, recovers exactly its own
    // orders and stock counters, and its log goes on where it ended.
    let database = TestDatabase::create().await;
    let pool = database.pool().await;
    let (a, state_a) = open(node_config(&database, "node-a")).await;
    let (b, state_b) = open(node_config(&database, "node-b")).await;
    assert_eq!((state_a.last_lsn, state_b.last_lsn), (0, 0));

    let refused = MySqlJournal::open(node_config(&database, "node-a")).await;
    assert!(
        matches!(refused, Err(SchemaError::JournalHeld { .. })),
        "a second journal of node-a while it runs: {:?}",
        refused.err()
    );

    // Node a: 3 sold, 2 held; node b: 2 sold, 1 held; both at once.
    let mut orders_a = BTreeSet::new();
    let mut records_a = vec![product("S", 100)];
    for (key, quantity, status, payment) in [
        ("a-1", 1, OrderStatus::Paid, "pay_a1"),
        ("a-2", 1, OrderStatus::Paid, "pay_a2"),
        ("a-3", 1, OrderStatus::Paid, "pay_a3"),
        ("a-4", 2, OrderStatus::Reserved, "pay_a4"),
    ] {
        let (id, record) = placed(key, "S", quantity, status, payment);
        orders_a.insert(id.as_str().to_owned());
        records_a.push(record);
    }
    let mut orders_b = BTreeSet::new();
    let mut records_b = vec![product("S", 100)];
    for (key, quantity, status, payment) in [
        ("b-1", 2, OrderStatus::Paid, "pay_b1"),
        ("b-2", 1, OrderStatus::Reserved, "pay_b2"),
    ] {
        let (id, record) = placed(key, "S", quantity, status, payment);
        orders_b.insert(id.as_str().to_owned());
        records_b.push(record);
    }
    let (appended_a, appended_b) =
        tokio::join!(append_all(&a, records_a), append_all(&b, records_b));
    let lsns = |appended: &[Appended]| appended.iter().map(|x| x.lsn).collect::<Vec<_>>();
    let first_seqs = |appended: &[Appended]| {
        appended[1..]
            .iter()
            .map(|x| x.first_event_seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(lsns(&appended_a), [1, 2, 3, 4, 5]);
    assert_eq!(lsns(&appended_b), [1, 2, 3]);
    assert_eq!(first_seqs(&appended_a), [1, 3, 5, 7]);
    assert_eq!(first_seqs(&appended_b), [1, 3]);

    wait_projected(&pool).await;
    assert_eq!(
        ranges(&pool, "journal", "lsn").await,
        [("node-a".into(), 1, 5, 5), ("node-b".into(), 1, 3, 3)]
    );
    assert_eq!(
        ranges(&pool, "outbox", "seq").await,
        [("node-a".into(), 1, 7, 7), ("node-b".into(), 1, 3, 3)]
    );
    assert_eq!(
        counters(&pool, "S").await,
        [("node-a".into(), 2, 3), ("node-b".into(), 1, 2)]
    );
    let owners: BTreeMap<String, String> =
        sqlx::query("SELECT CAST(order_id AS CHAR), CAST(node AS CHAR) FROM orders")
            .fetch_all(&pool)
            .await
            .expect("the orders")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
    for (orders, node) in [(&orders_a, "node-a"), (&orders_b, "node-b")] {
        for id in orders {
            assert_eq!(owners.get(id).map(String::as_str), Some(node), "{id}");
        }
    }
    assert_eq!(owners.len(), orders_a.len() + orders_b.len());
    // Each node's events are its own, from seq 1.
    for (journal, orders, last) in [(&a, &orders_a, 7), (&b, &orders_b, 3)] {
        let events = journal.events(0, 100).await.expect("the events");
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=last).collect::<Vec<_>>()
        );
        assert!(events.iter().all(|e| orders.contains(e.order_id.as_str())));
    }
    a.shutdown().await;
    b.shutdown().await;

    // Restarted with finished orders past retention: only held orders are loaded, and the units
    // of the paid ones come from the node's own stock counters.
    let pruning = |node| {
        let mut config = node_config(&database, node);
        config.retention.order_ms = -60_000;
        config
    };
    let (a, state_a) = open(pruning("node-a")).await;
    let (b, state_b) = open(pruning("node-b")).await;
    assert_eq!((state_a.last_lsn, state_b.last_lsn), (5, 3));
    assert_eq!(state_a.sold_pruned.get(&sku("S")), Some(&3));
    assert_eq!(state_b.sold_pruned.get(&sku("S")), Some(&2));
    assert_eq!(state_a.orders.len(), 1, "a-4 holds stock");
    assert_eq!(state_b.orders.len(), 1, "b-2 holds stock");
    assert!(order_ids(&state_a).is_subset(&orders_a));
    assert!(order_ids(&state_b).is_subset(&orders_b));
    // Each log goes on where it ended.
    let (id_a, record_a) = placed("a-5", "S", 1, OrderStatus::Paid, "pay_a5");
    let (id_b, record_b) = placed("b-3", "S", 1, OrderStatus::Paid, "pay_b3");
    orders_a.insert(id_a.as_str().to_owned());
    orders_b.insert(id_b.as_str().to_owned());
    let (more_a, more_b) = tokio::join!(
        append_all(&a, vec![record_a]),
        append_all(&b, vec![record_b])
    );
    assert_eq!((more_a[0].lsn, more_a[0].first_event_seq), (6, 8));
    assert_eq!((more_b[0].lsn, more_b[0].first_event_seq), (4, 4));
    a.shutdown().await;
    b.shutdown().await;

    // Restarted again, keeping every order: exactly its own.
    let (a, state_a) = open(node_config(&database, "node-a")).await;
    let (b, state_b) = open(node_config(&database, "node-b")).await;
    assert_eq!(order_ids(&state_a), orders_a);
    assert_eq!(order_ids(&state_b), orders_b);
    assert!(state_a.sold_pruned.is_empty() && state_b.sold_pruned.is_empty());
    wait_projected(&pool).await;
    assert_eq!(
        ranges(&pool, "journal", "lsn").await,
        [("node-a".into(), 1, 6, 6), ("node-b".into(), 1, 4, 4)]
    );
    assert_eq!(
        counters(&pool, "S").await,
        [("node-a".into(), 2, 4), ("node-b".into(), 1, 3)]
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_places_one_order_whichever_node_sends_it() {
    // Proves: an order placed under key K on node a, then the same checkout (same key, same order
    // id) on node b: the database refuses b's claim, b's record fails alone (its lsn kept by a
    // refused row, so b's log has no gap), b's log goes on, and the order stays a's.
    let database = TestDatabase::create().await;
    let pool = database.pool().await;
    let (a, _) = open(node_config(&database, "node-a")).await;
    let (b, _) = open(node_config(&database, "node-b")).await;
    append_all(&a, vec![product("K", 10)]).await;
    append_all(&b, vec![product("K", 10)]).await;
    let (order_id, on_a) = placed("shared-key", "K", 1, OrderStatus::Paid, "pay_on_a");
    let (same_id, on_b) = placed("shared-key", "K", 1, OrderStatus::Paid, "pay_on_b");
    assert_eq!(order_id, same_id, "order ids are derived from the key");
    assert_eq!(a.append(on_a).await.expect("a places the order").lsn, 2);
    match b.append(on_b).await {
        Err(JournalError::Rejected(reason)) => {
            assert!(reason.contains("Duplicate"), "{reason}")
        }
        other => panic!("b's duplicate claim must be refused: {other:?}"),
    }
    let (_, other) = placed("b-own", "K", 1, OrderStatus::Paid, "pay_b_own");
    assert_eq!(b.append(other).await.expect("b goes on").lsn, 3);

    let claims: Vec<(String, i64)> = sqlx::query(
        "SELECT CAST(node AS CHAR), lsn FROM journal WHERE idempotency_key = 'shared-key'",
    )
    .fetch_all(&pool)
    .await
    .expect("the claims")
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect();
    assert_eq!(claims, [("node-a".to_owned(), 2)]);
    let refused: Vec<i64> =
        sqlx::query_scalar("SELECT lsn FROM journal WHERE node = 'node-b' AND refused IS NOT NULL")
            .fetch_all(&pool)
            .await
            .expect("b's refused rows");
    assert_eq!(refused, [2]);
    wait_projected(&pool).await;
    assert_eq!(
        ranges(&pool, "journal", "lsn").await,
        [("node-a".into(), 1, 2, 2), ("node-b".into(), 1, 3, 3)]
    );
    let owner: String =
        sqlx::query_scalar("SELECT CAST(node AS CHAR) FROM orders WHERE order_id = ?")
            .bind(order_id.as_str())
            .fetch_one(&pool)
            .await
            .expect("the order");
    assert_eq!(owner, "node-a");
    assert_eq!(
        counters(&pool, "K").await,
        [("node-a".into(), 0, 1), ("node-b".into(), 0, 1)]
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_placed_on_one_node_and_sent_to_another_is_refused_by_the_database_and_replayed() {
    // Proves (and shows what the second node answers): a checkout placed under key K on node a,
    // then the same request on node b, a node with a name and log of its own that does not know
    // K: the database refuses b's claim (journal_order_id: the order id is derived from the key),
    // no second order exists, and b answers 500 internal, "the journal refused the record: ...
    // Duplicate entry ...; nothing was changed", again on a retry. (Until --node-id, b is made by giving the database's kept name a
    // new value while a is stopped: one node without --node-id holds the whole database.)
    let database = TestDatabase::create().await;
    let pool = database.pool().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = start(&dir.path().join("a"), &["--mysql-url", &database.url]);
    let mut client = a.client();
    assert_eq!(client.put_product("K", 100, 10).await.status, 200);
    let first = client
        .checkout("shared-key", "K", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(first.status, 201);
    let order_id = first.json()["order_id"].as_str().expect("id").to_owned();
    wait_projected(&pool).await;
    assert!(a.terminate().success());
    let node_a: String = sqlx::query_scalar("SELECT CAST(name AS CHAR) FROM node_name")
        .fetch_one(&pool)
        .await
        .expect("a's name");
    sqlx::query("UPDATE node_name SET name = 'node_b000000000000000'")
        .execute(&pool)
        .await
        .expect("name node b");

    let b = start(&dir.path().join("b"), &["--mysql-url", &database.url]);
    let mut client = Client::new(b.addr);
    assert_eq!(
        client.stock("K").await,
        (10, 10, 0, 0),
        "b sells none of a's"
    );
    let second = client
        .checkout("shared-key", "K", 1, "tok_ok")
        .await
        .expect("answer");
    // The database refuses b's record (a's order holds the key) and b replays a's answer from
    // it: one order, and the retry's answer is the first one, byte for byte.
    assert_eq!(
        (second.status, second.replayed, &second.body),
        (201, true, &first.body),
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    assert_eq!(
        client.stock("K").await,
        (10, 10, 0, 0),
        "b's hold was given back"
    );
    // b keeps the answer it learnt: a retry there replays it without the database.
    let retried = client
        .checkout("shared-key", "K", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(
        (retried.status, retried.replayed, &retried.body),
        (201, true, &first.body)
    );
    let orders: Vec<(String, String)> =
        sqlx::query("SELECT CAST(order_id AS CHAR), CAST(node AS CHAR) FROM orders")
            .fetch_all(&pool)
            .await
            .expect("the orders")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
    assert_eq!(orders, [(order_id, node_a)], "one order, a's");
    let refused: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM journal WHERE node = 'node_b000000000000000' AND refused IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .expect("b's refused rows");
    assert_eq!(refused, 1, "the refused attempt keeps its lsn in b's log");
}

/// Copies every row `from` holds into `to`, which has the previous version's schema (migrations
/// up to `20261206000007`): each column `to` has, from `from`'s column of the same name, `node`
/// left out. What a database the previous version wrote holds: the same rows (this version writes
/// the same records, claims and projections), without their node.
async fn copy_into_previous_schema(from: &TestDatabase, to: &TestDatabase) {
    let pool = to.pool().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
         WHERE table_schema = ? AND table_type = 'BASE TABLE' AND table_name <> '_sqlx_migrations'",
    )
    .bind(&to.name)
    .fetch_all(&pool)
    .await
    .expect("the tables");
    for table in tables {
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(column_name AS CHAR) FROM information_schema.columns \
             WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
        )
        .bind(&to.name)
        .bind(&table)
        .fetch_all(&pool)
        .await
        .expect("the columns");
        // The two columns this version dropped: the cursor's name and the fence's row id.
        let values: Vec<String> = columns
            .iter()
            .map(|column| match (table.as_str(), column.as_str()) {
                ("projection_cursor", "name") => "'tables'".to_owned(),
                ("journal_writer", "id") => "1".to_owned(),
                (_, column) => format!("`{column}`"),
            })
            .collect();
        let names: Vec<String> = columns.iter().map(|c| format!("`{c}`")).collect();
        sqlx::query(&format!("DELETE FROM `{table}`"))
            .execute(&pool)
            .await
            .expect("empty the table");
        sqlx::query(&format!(
            "INSERT INTO `{table}` ({}) SELECT {} FROM `{}`.`{table}`",
            names.join(", "),
            values.join(", "),
            from.name
        ))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("copy {table}: {e}"));
    }
}

/// Waits until MySQL holds every record the server's journal holds: at once with MySQL as the
/// journal; in write-behind once the applier has shipped them (its lag drained).
async fn mysql_caught_up(client: &mut Client, pool: &sqlx::MySqlPool) {
    crate::helpers::eventually(
        "MySQL to hold the whole journal",
        std::time::Duration::from_secs(60),
        async || {
            let metrics = client.get("/metrics").await;
            String::from_utf8_lossy(&metrics.body).contains("turnstile_mysql_lag_records 0\n")
        },
    )
    .await;
    wait_projected(pool).await;
}

/// An order's id and status as a server answers it.
async fn status_of(client: &mut Client, order_id: &str) -> String {
    let answer = client.get(&format!("/v1/orders/{order_id}")).await;
    assert_eq!(answer.status, 200, "order {order_id}");
    answer.json()["status"].as_str().expect("status").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_nodes_database_keeps_every_order_through_the_migration_to_node_logs() {
    // Proves: a database of the previous version (migrations up to 20261206000007) holding one
    // node's orders keeps them through `migrate`: with MySQL as the journal the rows become the
    // log of the node named in node_name; in write-behind (node_name empty) the unnamed log, which
    // the node adopts at its next start from its data dir. Restarted, the node finds every order,
    // its stock, its events and its answers, and its log goes on without a gap.
    for write_behind in [false, true] {
        let current = TestDatabase::create().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let mut args = vec!["--mysql-url", current.url.as_str()];
        if write_behind {
            args.push("--mysql-write-behind");
        }
        let mut app = start(&data_dir, &args);
        let mut client = app.client();
        assert_eq!(client.put_product("M", 100, 10).await.status, 200);
        let mut orders = Vec::new();
        let mut first_answers = Vec::new();
        for (key, token, status) in [
            ("m-1", "tok_ok", 201),
            ("m-2", "tok_ok", 201),
            ("m-3", "tok_decline", 402),
            ("m-4", "tok_ok", 201),
        ] {
            let answer = client.checkout(key, "M", 1, token).await.expect("answer");
            assert_eq!(answer.status, status, "{key}");
            let id = answer.json()["order_id"].as_str().expect("id").to_owned();
            orders.push(id);
            first_answers.push(answer.body.clone());
        }
        let cancelled = client
            .send("POST", &format!("/v1/orders/{}/cancel", orders[1]), &[], "")
            .await;
        assert_eq!(cancelled.status, 200);
        let mut statuses = Vec::new();
        for id in &orders {
            statuses.push(status_of(&mut client, id).await);
        }
        assert_eq!(statuses, ["paid", "refunded", "released", "paid"]);
        let stock = client.stock("M").await;
        assert_eq!(stock, (10, 8, 0, 2));
        let events = client.all_events().await;
        let current_pool = current.pool().await;
        mysql_caught_up(&mut client, &current_pool).await;
        assert!(app.terminate().success());
        let node = if write_behind {
            turnstile::data_dir::node_name(&data_dir).expect("the data dir's name")
        } else {
            sqlx::query_scalar("SELECT CAST(name AS CHAR) FROM node_name")
                .fetch_one(&current_pool)
                .await
                .expect("the journal's name")
        };
        let last_lsn: i64 = sqlx::query_scalar("SELECT MAX(lsn) FROM journal")
            .fetch_one(&current_pool)
            .await
            .expect("the log's end");

        let previous = TestDatabase::create_empty().await;
        let pool = previous.pool().await;
        sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(
                turnstile::journal::mysql::MIGRATOR
                    .iter()
                    .filter(|m| m.version < 20261206000008)
                    .cloned()
                    .collect(),
            ),
            ..sqlx::migrate::Migrator::DEFAULT
        }
        .run(&pool)
        .await
        .expect("the previous version's schema");
        copy_into_previous_schema(&current, &previous).await;
        previous.migrate();
        let expected = if write_behind { "" } else { node.as_str() };
        for table in [
            "journal",
            "outbox",
            "orders",
            "inventory",
            "projection_cursor",
        ] {
            let nodes: Vec<String> =
                sqlx::query_scalar(&format!("SELECT DISTINCT CAST(node AS CHAR) FROM {table}"))
                    .fetch_all(&pool)
                    .await
                    .expect("the nodes");
            // (Write-behind's outbox stays empty: its events are in the data dir.)
            assert!(
                nodes.iter().all(|n| n == expected) && (table == "outbox" || !nodes.is_empty()),
                "write-behind {write_behind}: {table}: {nodes:?}"
            );
        }

        // Started again: MySQL as the journal on a new data dir (the name is the database's),
        // write-behind on its own.
        let restart_dir = if write_behind {
            data_dir.clone()
        } else {
            dir.path().join("fresh")
        };
        let mut args = vec!["--mysql-url", previous.url.as_str()];
        if write_behind {
            args.push("--mysql-write-behind");
        }
        let app = start(&restart_dir, &args);
        assert_eq!(
            app.log().contains("adopted the database's unnamed log"),
            write_behind,
            "{}",
            app.log()
        );
        let mut client = app.client();
        for (id, status) in orders.iter().zip(&statuses) {
            assert_eq!(&status_of(&mut client, id).await, status, "{id}");
        }
        assert_eq!(client.stock("M").await, stock);
        assert_eq!(client.all_events().await, events);
        let replay = client
            .checkout("m-1", "M", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(
            (replay.status, replay.replayed, &replay.body),
            (201, true, &first_answers[0]),
            "write-behind {write_behind}: the answer under m-1 is replayed"
        );
        let fresh = client
            .checkout("m-5", "M", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(fresh.status, 201);
        // The fresh order reaches MySQL's log (in write-behind, behind its answer), then every
        // record is applied.
        crate::helpers::eventually(
            "the fresh order to reach MySQL's log",
            std::time::Duration::from_secs(60),
            async || {
                sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(lsn), 0) FROM journal")
                    .fetch_one(&pool)
                    .await
                    .expect("the log's end")
                    > last_lsn as i64
            },
        )
        .await;
        mysql_caught_up(&mut client, &pool).await;
        let logs = ranges(&pool, "journal", "lsn").await;
        assert_eq!(logs.len(), 1, "write-behind {write_behind}: {logs:?}");
        let (log_node, first, last, count) = &logs[0];
        assert_eq!(log_node, &node, "write-behind {write_behind}");
        assert_eq!((*first, *count), (1, *last));
        assert!(*last > last_lsn, "the log went on after lsn {last_lsn}");
        assert_eq!(client.stock("M").await, (10, 7, 0, 3));
    }
}
