//! Under pool saturation every answer must reach the client that asked (a bug poolers have
//! shipped). 64 clients share 4 server connections; every answer names its client.

use crate::fixture::Proxy;
use crate::support::shared_pg;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_through_four_connections_each_get_their_own_answers() {
    let proxy = Proxy::start(shared_pg(), |c| {
        c.pool.max_size = 4;
        c.pool.checkout_timeout = std::time::Duration::from_secs(60);
    });
    let mut tasks = Vec::new();
    for id in 0..64i32 {
        let client = proxy.connect("postgres", "", "postgres").await;
        tasks.push(tokio::spawn(async move {
            let stmt = client
                .prepare("SELECT $1::int, pg_backend_pid()")
                .await
                .expect("prepare");
            for round in 0..50 {
                // Extended protocol with a parameter...
                let got: i32 = client
                    .query_one(&stmt, &[&id])
                    .await
                    .expect("extended")
                    .get(0);
                assert_eq!(
                    got, id,
                    "client {id} got another client's row (round {round})"
                );
                // ...and its simple-protocol twin, with the id in the text.
                let rows = client
                    .simple_query(&format!("SELECT {id}, 'c{id}r{round}'"))
                    .await
                    .expect("simple");
                let row = rows
                    .iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                        _ => None,
                    })
                    .expect("a row");
                assert_eq!(row.get(0), Some(id.to_string().as_str()));
                assert_eq!(row.get(1), Some(format!("c{id}r{round}").as_str()));
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
}
