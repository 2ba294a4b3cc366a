package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"
)

// Event is one announcement to subscribers: a vTPM moved ("out" on the source, "in" on the
// destination) or a saved state was restored ("restore"). Relying parties re-establish trust
// in the VM on it. A stream begins with an event of type "subscribed" (no history): every
// move after it is announced on that stream.
type Event struct {
	Type    string       `json:"type"` // "migration", or "subscribed"
	History HistoryEntry `json:"history"`
}

func eventOf(h HistoryEntry) Event { return Event{Type: "migration", History: h} }

// eventHub fans events out to the API's stream subscribers and to a webhook.
type eventHub struct {
	webhook string
	log     *slog.Logger

	mu   sync.Mutex
	subs map[chan Event]struct{}

	done      chan struct{} // closed when the manager stops: streams end
	closeOnce sync.Once
}

func newEventHub(webhook string, log *slog.Logger) *eventHub {
	return &eventHub{webhook: webhook, log: log, subs: map[chan Event]struct{}{}, done: make(chan struct{})}
}

// close ends every stream (the manager is stopping; a stream would hold its shutdown).
func (h *eventHub) close() { h.closeOnce.Do(func() { close(h.done) }) }

// subscribe returns a channel of events and its cancel function.
func (h *eventHub) subscribe() (<-chan Event, func()) {
	ch := make(chan Event, 32)
	h.mu.Lock()
	h.subs[ch] = struct{}{}
	h.mu.Unlock()
	return ch, func() {
		h.mu.Lock()
		delete(h.subs, ch)
		h.mu.Unlock()
	}
}

// publish never blocks: a subscriber that does not keep up loses events (it sees a gap in
// `vtpmd history`), and the webhook is posted in the background with a few retries.
func (h *eventHub) publish(e Event) {
	h.mu.Lock()
	for ch := range h.subs {
		select {
		case ch <- e:
		default:
			h.log.Warn("event subscriber too slow: event dropped", "ticket", e.History.Ticket)
		}
	}
	h.mu.Unlock()
	if h.webhook != "" {
		go h.post(e)
	}
}

func (h *eventHub) post(e Event) {
	body, err := json.Marshal(e)
	if err != nil {
		return
	}
	c := &http.Client{Timeout: 10 * time.Second}
	for attempt, wait := 0, time.Second; attempt < 5; attempt, wait = attempt+1, 2*wait {
		resp, err := c.Post(h.webhook, "application/json", bytes.NewReader(body))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				return
			}
			err = fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		h.log.Warn("migration webhook", "url", h.webhook, "attempt", attempt+1, "err", err)
		time.Sleep(wait)
	}
}

// serveEvents streams events as server-sent events (text/event-stream) until the client
// goes away: "event: migration" and a JSON data line per event.
func (h *eventHub) serveEvents(ctx context.Context, w http.ResponseWriter) {
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	// a stream outlives the API's write timeout
	http.NewResponseController(w).SetWriteDeadline(time.Time{})
	ch, cancel := h.subscribe()
	defer cancel()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	// the first event says the subscription is in place: nothing published after it is missed
	fmt.Fprint(w, "event: subscribed\ndata: {\"type\":\"subscribed\"}\n\n")
	fl.Flush()
	keep := time.NewTicker(15 * time.Second)
	defer keep.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.done:
			return
		case <-keep.C:
			fmt.Fprint(w, ": keep-alive\n\n")
		case e := <-ch:
			b, _ := json.Marshal(e)
			fmt.Fprintf(w, "event: %s\ndata: %s\n\n", e.Type, b)
		}
		fl.Flush()
	}
}
