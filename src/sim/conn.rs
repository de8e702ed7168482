//! One HTTP/1.1 connection of the simulated backend, with Tomcat's connection
//! rules: idle connections close after `keepAliveTimeout` without a response,
//! and the `maxKeepAliveRequests`-th response carries `Connection: close`.

use super::body::SimBody;
use super::handler::{App, Port};
use crate::listener::activity::{Activity, ActivityIo};
use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Serves one accepted connection until the client closes it, Tomcat's rules
/// close it, or `shutdown` turns true.
pub(crate) async fn serve(
    stream: TcpStream,
    app: Arc<App>,
    port: Port,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    app.stats.connection_opened();
    let activity = Activity::new();
    let io = TokioIo::new(ActivityIo::new(stream, Arc::clone(&activity)));
    let service = {
        let activity = Arc::clone(&activity);
        let app = Arc::clone(&app);
        service_fn(move |req: Request<Incoming>| {
            let in_flight = activity.request_started(req.version());
            let nth = u32::try_from(activity.requests()).unwrap_or(u32::MAX);
            let app = Arc::clone(&app);
            async move {
                let mut response: Response<SimBody> = app.handle(req, port).await;
                let max = app.cfg.max_keep_alive_requests;
                if max > 0 && nth >= max {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    app.stats.connection_closed_max_requests();
                }
                response.body_mut().hold(in_flight);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut conn = pin!(http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(io, service));

    let keep_alive = Duration::from_millis(app.cfg.keep_alive_timeout_ms);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "sim connection ended with an error");
                }
                return;
            }
            () = activity.quiet_for(keep_alive), if !closing && !keep_alive.is_zero() => {
                app.stats.connection_closed_idle();
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = stop_requested(&mut shutdown), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
pub(crate) async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
