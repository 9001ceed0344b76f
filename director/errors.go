package director

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/store"
)

// One taxonomy of errors decides both what the API answers and how the CLI
// exits, so the two never disagree about what "refused input" is.

// ErrRefused marks an error the daemon answered as refused input.
var ErrRefused = errors.New("refused")

// ErrTooLarge is a request body above the API's limit (413).
var ErrTooLarge = errors.New("request body too large")

// RequestError is a bad request parameter (an API query parameter, a
// request body field or a command-line flag or argument): refused input.
type RequestError struct {
	// Param names the parameter, flag or argument.
	Param string
	// Value is what was given (quoted in the message, cut short).
	Value string
	// Msg says what is wrong and what is wanted.
	Msg string
}

func (e *RequestError) Error() string {
	if e.Value == "" {
		return fmt.Sprintf("%s: %s", e.Param, e.Msg)
	}
	return fmt.Sprintf("%s %q: %s", e.Param, shortValue(e.Value), e.Msg)
}

// badRequest builds a RequestError.
func badRequest(param, value, format string, args ...any) error {
	return &RequestError{Param: param, Value: value, Msg: fmt.Sprintf(format, args...)}
}

// IsRefused reports whether err means the input was refused: a bad file, a
// bad configuration, a conflict with the table, a bad parameter. The API
// answers such errors with 422 and the CLI exits with status 2.
func IsRefused(err error) bool {
	var (
		be *affinity.BatchError
		fe *nms.Errors
		re *RequestError
		ce *ConfigError
	)
	return errors.As(err, &be) || errors.As(err, &fe) || errors.As(err, &re) || errors.As(err, &ce) ||
		errors.Is(err, affinity.ErrConflict) || errors.Is(err, affinity.ErrInvalid) ||
		errors.Is(err, affinity.ErrUnknownNode) || errors.Is(err, ErrRefused) || errors.Is(err, ErrTooLarge) ||
		errors.Is(err, store.ErrBackupTarget)
}

// ExitCode is the CLI's exit status for err: 0 for none, 2 for refused
// input, 1 for everything else (a damaged store, no daemon, a kernel
// error).
func ExitCode(err error) int {
	switch {
	case err == nil:
		return 0
	case IsRefused(err):
		return 2
	}
	return 1
}

// httpStatus is the API's status for err.
func httpStatus(err error) int {
	var mbe *http.MaxBytesError
	switch {
	case errors.Is(err, ErrTooLarge), errors.As(err, &mbe):
		return http.StatusRequestEntityTooLarge
	case errors.Is(err, ErrNotMaster):
		return http.StatusConflict
	case errors.Is(err, affinity.ErrNotFound):
		return http.StatusNotFound
	case IsRefused(err):
		return http.StatusUnprocessableEntity
	}
	return http.StatusInternalServerError
}
