//! The shop's cart service. It never calls the inventory service: adding an
//! item publishes a reservation request to Warren (persistent, confirmed)
//! and answers at once with the item pending; the inventory's replies come
//! back on the `cart.replies` queue and update the cart. So the cart keeps
//! answering at its normal speed whether inventory is slow, down or
//! catching up on a backlog.
//!
//! HTTP API (JSON):
//! - `POST /carts/{cart}/items` `{"sku": "sku-1", "qty": 2}` → 202 `{"reservation_id", "status": "pending"}`
//! - `GET /carts/{cart}` → `{"cart", "items": [{"reservation_id", "sku", "qty", "status"}]}`
//! - `POST /carts/{cart}/checkout` → 202 `{"order_id"}` (an `order.placed` event)
//! - `GET /stats` → `{"pending", "reserved", "rejected"}`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The wiring both services declare, identically.
const EXCHANGE: &str = "shop";
const REQUESTS: &str = "inventory.reservations";
const DEAD: &str = "inventory.dead";
const REPLIES: &str = "cart.replies";
const REQUEST_KEY: &str = "reservation.request";

#[derive(Parser)]
#[command(about = "The shop example's cart service")]
struct Args {
    #[arg(long, env = "WARREN_AMQP_URL", default_value = "amqp://guest:guest@localhost:5672/%2F")]
    amqp_url: String,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
}

#[derive(Clone, Serialize)]
struct Item {
    reservation_id: String,
    sku: String,
    qty: u32,
    status: String,
}

#[derive(Default)]
struct Carts {
    items: HashMap<String, Vec<Item>>,
    /// reservation id → cart id
    owners: HashMap<String, String>,
}

struct Shop {
    publisher: Channel,
    carts: Mutex<Carts>,
    next_id: AtomicU64,
    /// Distinguishes ids across restarts of the cart.
    run: u64,
}

impl Shop {
    fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:x}-{}", self.run, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn settle(&self, reservation_id: &str, status: &str) {
        let mut carts = self.carts.lock();
        let Some(cart) = carts.owners.get(reservation_id).cloned() else { return };
        if let Some(item) =
            carts.items.get_mut(&cart).and_then(|items| items.iter_mut().find(|i| i.reservation_id == reservation_id))
        {
            item.status = status.to_string();
        }
    }
}

#[derive(Deserialize)]
struct AddItem {
    sku: String,
    qty: u32,
}

#[derive(Deserialize)]
struct Reply {
    reservation_id: String,
    status: String,
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Declares the exchange and queues, so requests queue up even before the
/// inventory service ever ran.
async fn declare(channel: &Channel) -> anyhow::Result<()> {
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let mut requests = FieldTable::default();
    requests.insert("x-retry-delay".into(), AMQPValue::LongLongInt(200));
    requests.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(3));
    requests.insert("x-dead-letter-exchange".into(), text(""));
    requests.insert("x-dead-letter-routing-key".into(), text(DEAD));
    channel.queue_declare(DEAD.into(), durable, FieldTable::default()).await?;
    channel.queue_declare(REQUESTS.into(), durable, requests).await?;
    channel
        .queue_bind(
            REQUESTS.into(),
            EXCHANGE.into(),
            REQUEST_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel.queue_declare(REPLIES.into(), durable, FieldTable::default()).await?;
    Ok(())
}

/// Publishes a persistent JSON message and waits for the broker's confirm.
async fn publish(shop: &Shop, key: &str, body: &serde_json::Value, id: &str) -> anyhow::Result<()> {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(id))
        .with_correlation_id(ShortString::from(id))
        .with_reply_to(ShortString::from(REPLIES));
    let payload = serde_json::to_vec(body)?;
    let confirm = shop
        .publisher
        .basic_publish(EXCHANGE.into(), key.into(), BasicPublishOptions::default(), &payload, properties)
        .await?;
    anyhow::ensure!(confirm.await?.is_ack(), "the broker refused the message");
    Ok(())
}

async fn add_item(
    State(shop): State<Arc<Shop>>,
    Path(cart): Path<String>,
    Json(add): Json<AddItem>,
) -> (StatusCode, Json<serde_json::Value>) {
    if add.qty == 0 || add.sku.is_empty() {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "sku and a positive qty are needed"})));
    }
    let reservation_id = shop.new_id("r");
    {
        // Recorded before publishing: the reply may come back before the
        // confirm does.
        let mut carts = shop.carts.lock();
        carts.owners.insert(reservation_id.clone(), cart.clone());
        carts.items.entry(cart.clone()).or_default().push(Item {
            reservation_id: reservation_id.clone(),
            sku: add.sku.clone(),
            qty: add.qty,
            status: "pending".into(),
        });
    }
    let request = json!({"reservation_id": reservation_id, "cart_id": cart, "sku": add.sku, "qty": add.qty});
    match publish(&shop, REQUEST_KEY, &request, &reservation_id).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({"reservation_id": reservation_id, "status": "pending"}))),
        Err(error) => {
            let mut carts = shop.carts.lock();
            carts.owners.remove(&reservation_id);
            if let Some(items) = carts.items.get_mut(&cart) {
                items.retain(|i| i.reservation_id != reservation_id);
            }
            tracing::warn!(%error, "reservation request not accepted by the broker");
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": error.to_string()})))
        }
    }
}

async fn view_cart(State(shop): State<Arc<Shop>>, Path(cart): Path<String>) -> Json<serde_json::Value> {
    let items = shop.carts.lock().items.get(&cart).cloned().unwrap_or_default();
    Json(json!({"cart": cart, "items": items}))
}

async fn checkout(State(shop): State<Arc<Shop>>, Path(cart): Path<String>) -> (StatusCode, Json<serde_json::Value>) {
    let items = shop.carts.lock().items.get(&cart).cloned().unwrap_or_default();
    let reserved: Vec<&Item> = items.iter().filter(|i| i.status == "reserved").collect();
    if reserved.is_empty() {
        return (StatusCode::CONFLICT, Json(json!({"error": "nothing reserved in this cart yet"})));
    }
    let order_id = shop.new_id("o");
    let event = json!({"order_id": order_id, "cart_id": cart, "items": reserved});
    match publish(&shop, "order.placed", &event, &order_id).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({"order_id": order_id}))),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": error.to_string()}))),
    }
}

async fn stats(State(shop): State<Arc<Shop>>) -> Json<serde_json::Value> {
    let carts = shop.carts.lock();
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for item in carts.items.values().flatten() {
        *counts.entry(item.status.as_str()).or_default() += 1;
    }
    Json(json!({
        "pending": counts.get("pending").copied().unwrap_or(0),
        "reserved": counts.get("reserved").copied().unwrap_or(0),
        "rejected": counts.get("rejected").copied().unwrap_or(0),
    }))
}

/// Applies the inventory's replies to the carts, acking each once applied.
async fn apply_replies(shop: Arc<Shop>, channel: Channel) -> anyhow::Result<()> {
    let mut replies = channel
        .basic_consume(REPLIES.into(), "cart".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    while let Some(delivery) = replies.next().await {
        let delivery = delivery?;
        match serde_json::from_slice::<Reply>(&delivery.data) {
            Ok(reply) => shop.settle(&reply.reservation_id, &reply.status),
            Err(error) => tracing::warn!(%error, "unreadable reply ignored"),
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    anyhow::bail!("the reply consumer stopped")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", args.amqp_url))?;
    let publisher = connection.create_channel().await?;
    declare(&publisher).await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let consumer = connection.create_channel().await?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let shop = Arc::new(Shop { publisher, carts: Mutex::new(Carts::default()), next_id: AtomicU64::new(1), run });
    let replies = tokio::spawn(apply_replies(shop.clone(), consumer));

    let app = Router::new()
        .route("/carts/{cart}/items", post(add_item))
        .route("/carts/{cart}", get(view_cart))
        .route("/carts/{cart}/checkout", post(checkout))
        .route("/stats", get(stats))
        .with_state(shop);
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(address = %args.listen, "cart listening");
    tokio::select! {
        served = axum::serve(listener, app) => served?,
        stopped = replies => stopped??,
    }
    Ok(())
}
