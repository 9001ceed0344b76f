package report

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
)

// ErrNotMaster is what a director's Accept function wraps when it is not
// the master: the handler answers 409 and the agent tries the other
// director.
var ErrNotMaster = errors.New("not the master director")

// ErrUnknownNode is what a director's Accept function wraps for a report
// of a node its table does not hold (a token left for a removed node):
// the handler answers 403.
var ErrUnknownNode = errors.New("node not in the director's table")

// HandlerOptions wire the report endpoint into a director.
type HandlerOptions struct {
	// Authenticate returns the node a bearer token belongs to (see
	// Tokens); false refuses the request with 401.
	Authenticate func(token string) (node string, ok bool)
	// Accept applies a decoded, validated report of the authenticated node
	// (for example Inbox.Accept followed by the director's merge of the
	// Change). An error wrapping ErrNotMaster answers 409, ErrWrongNode
	// or ErrUnknownNode 403, anything else 500.
	Accept func(node string, r *Report) (Ack, error)
	// Limits bound the body and its counts (zero: DefaultLimits).
	Limits Limits
	// Refused, when set, is called for every refused request with the
	// node (empty before authentication), the HTTP status and the reason:
	// for counting and logging.
	Refused func(node string, status int, err error)
}

// apiError matches the director API's error body.
type apiError struct {
	Error   string `json:"error"`
	Refused bool   `json:"refused,omitempty"`
}

// Handler serves POST Path.
func Handler(o HandlerOptions) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fail := func(node string, status int, err error) {
			if o.Refused != nil {
				o.Refused(node, status, err)
			}
			if status == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", "Bearer")
			}
			writeJSON(w, status, apiError{Error: err.Error(), Refused: status != http.StatusInternalServerError})
		}
		if r.Method != http.MethodPost {
			fail("", http.StatusMethodNotAllowed, errors.New("agent report: POST only"))
			return
		}
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		node := ""
		if ok {
			node, ok = o.Authenticate(tok)
		}
		if !ok {
			fail("", http.StatusUnauthorized, errors.New("agent report: missing or unknown node token"))
			return
		}
		rep, err := Decode(r.Body, o.Limits)
		if err != nil {
			status := http.StatusUnprocessableEntity
			if errors.Is(err, ErrTooLarge) {
				status = http.StatusRequestEntityTooLarge
			}
			fail(node, status, err)
			return
		}
		ack, err := o.Accept(node, rep)
		switch {
		case err == nil:
			writeJSON(w, http.StatusOK, ack)
		case errors.Is(err, ErrNotMaster):
			fail(node, http.StatusConflict, err)
		case errors.Is(err, ErrWrongNode), errors.Is(err, ErrUnknownNode):
			fail(node, http.StatusForbidden, err)
		default:
			fail(node, http.StatusInternalServerError, err)
		}
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// Tokens returns an Authenticate function for a map of node name to
// token. Tokens are compared by their SHA-256 digests, so a lookup takes
// the same time whichever byte of a guess is wrong.
func Tokens(byNode map[string]string) func(token string) (string, bool) {
	idx := make(map[[sha256.Size]byte]string, len(byNode))
	for node, tok := range byNode {
		if tok != "" {
			idx[sha256.Sum256([]byte(tok))] = node
		}
	}
	return func(token string) (string, bool) {
		if token == "" {
			return "", false
		}
		n, ok := idx[sha256.Sum256([]byte(token))]
		return n, ok
	}
}
